"""The trainer's objective on per-sequence log-prob sums: the paired losses through
``alignkit.losses.logprob_loss``, KTO through ``kto_loss``.

KTO's reference point z₀ (``loss_options.kl_estimate``): ``mismatched`` (default, as in the paper
and TRL) scores each prompt with the completion of a fixed other example (the next one in dataset
order), packed into the same forward as extra sequences; ``zero`` uses z₀ = 0 and skips them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.losses import kto_loss, logprob_loss
from alignkit.losses.fused import split_options

_KTO_OPTIONS = ("beta", "desirable_weight", "undesirable_weight", "kl_estimate")


def check_loss_options(loss: str, options: dict) -> None:
    """Names and values of a loss's options, checked by running the loss itself once on a dummy
    pair (or KTO example) of zeros: the same code and messages as a real call, before any model
    is built."""
    if loss == "kto":
        bad = sorted(set(options) - set(_KTO_OPTIONS))
        if bad:
            raise ValueError(f"option(s) {bad} do not apply to loss 'kto'; it takes "
                             f"{', '.join(_KTO_OPTIONS)}")
        if options.get("kl_estimate", "mismatched") not in ("mismatched", "zero"):
            raise ValueError("kl_estimate must be mismatched or zero, got "
                             f"{options['kl_estimate']!r}")
        z = torch.zeros(1)
        kto_loss(z, z, torch.ones(1, dtype=torch.bool),
                 **{k: v for k, v in options.items() if k != "kl_estimate"})
        return
    own, common = split_options(loss, options)
    extra = sorted(set(common) - {"average"})
    if extra:
        raise ValueError(f"option(s) {extra} are set by the trainer (backend: a config key; "
                         "softcap / temperature: from the model's config), not in loss_options")
    if "average" in common and not isinstance(common["average"], bool):
        raise ValueError(f"average must be true or false, got {common['average']!r}")
    z = torch.zeros(2)
    logprob_loss(z, torch.ones(2, dtype=torch.long), loss=loss,
                 ref_logprobs=z if loss == "dpo" else None, **options)


def kto_uses_kl(loss: str, options: dict) -> bool:
    return loss == "kto" and options.get("kl_estimate", "mismatched") == "mismatched"


def compute_loss(loss: str, options: dict, sums: Tensor, counts: Tensor,
                 ref: Optional[tuple], desirable: Optional[Tensor] = None):
    """sums/counts [S] from the policy; ref = (sums [S], counts [S]) or None (reference-free).
    Returns (loss, metrics)."""
    if loss == "kto":
        opts = {k: v for k, v in options.items() if k != "kl_estimate"}
        b = desirable.shape[0]
        ref_sums = ref[0] if ref is not None else torch.zeros_like(sums)
        kw = {}
        if sums.shape[0] == 2 * b:
            kw = dict(policy_kl_logps=sums[b:], ref_kl_logps=ref_sums[b:])
        return kto_loss(sums[:b], ref_sums[:b], desirable, **opts, **kw)
    ref_logps = None
    if loss == "dpo":
        if ref is None:                      # reference: none -> reference-free DPO (ref = 0)
            ref_logps = torch.zeros_like(sums)
        else:
            rs, rc = ref
            ref_logps = rs / rc.clamp(min=1).to(rs.dtype) if options.get("average") else rs
    return logprob_loss(sums, counts, loss=loss, ref_logprobs=ref_logps, **options)
