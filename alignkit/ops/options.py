"""Non-tensor options of the log-prob ops, carried in one frozen dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton", "cpp")


def _real(v) -> bool:
    """A finite int or float; a bool is not a number here (temperature=True is a mistake)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class LogprobOptions:
    """Options shared by every layer of the log-prob ops.

    ignore_index:   label value that marks a position with no target; its outputs are exactly 0.0.
    temperature:    logits are divided by it (after the softcap), > 0.
    softcap:        if set, logits become ``softcap * tanh(logits / softcap)`` first (Gemma-2 style).
    return_entropy: also return the entropy of the full distribution at labelled positions.
    backend:        "auto" | "torch" | "triton" | "cpp".
    """

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: float | None = None
    return_entropy: bool = False
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not (_real(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.softcap is not None and not (_real(self.softcap) and self.softcap > 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {self.softcap!r}")
        if not isinstance(self.return_entropy, bool):
            raise TypeError(f"return_entropy must be a bool, got {self.return_entropy!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def inv_temp(self) -> float:
        return 1.0 / float(self.temperature)

    @property
    def cap(self) -> float:
        """softcap as the kernels take it: 0.0 means off."""
        return float(self.softcap) if self.softcap is not None else 0.0


def materialize_grads(grad_lp, grad_ent, lse, ent):
    """Upstream gradients of (logprobs, entropy) as the backward ops take them: zeros for an
    unused log-prob output, None for the entropy when it was not returned."""
    if grad_lp is None:
        grad_lp = lse.new_zeros(lse.shape[:-1])
    if ent is None:
        return grad_lp, None
    return grad_lp, (grad_ent if grad_ent is not None else torch.zeros_like(ent))
