"""``alignkit bench --loss sft``: alignkit.sft_loss (plain, and with label smoothing and z-loss)
against the peers' supervised cross-entropy on the same inputs: Liger's fused linear
cross-entropy (a Triton kernel: CUDA only), and the per-token log-probs of CCE, torch's chunked
F.linear_cross_entropy and TRL's ChunkedLogProbFunction under the shared math
loss = −Σ_labelled lp / (labelled tokens) (methods.peer_step). The floor: the three GEMMs over
the labelled tokens (methods.floor); the smoothing and z-loss rows add no GEMM.
"""
from __future__ import annotations

import alignkit

# alignkit's rows: (name, sft_loss options)
ROWS = (("alignkit sft_loss", {}),
        ("alignkit sft_loss (label_smoothing=0.1, z_loss=1e-4)",
         dict(label_smoothing=0.1, z_loss=1e-4)))


def alignkit_steps(case, backend="auto", tiles=None) -> dict:
    """{name: step} of alignkit's rows, each run until its plan is decided (methods.settled)."""
    from alignkit.bench.methods import settled
    out = {}
    for name, kw in ROWS:
        def step(kw=kw):
            alignkit.sft_loss(case.h, case.W, case.y, backend=backend, tiles=tiles,
                              **kw)[0].backward()
        out[name] = settled(name, step)
    return out


def peer_loss(lp, case):
    """The shared SFT math on a peer's per-token log-probs [S, T] (0 at ignored tokens)."""
    return -lp.sum() / case.mask.sum().clamp(min=1)


def liger_flce(case):
    """Liger's LigerFusedLinearCrossEntropyLoss (mean over labelled tokens), on CUDA."""
    if case.h.device.type != "cuda":
        raise NotImplementedError("Liger's fused linear cross-entropy is a Triton kernel (CUDA "
                                  "tensors only)")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    h, y = case.h.reshape(-1, case.H), case.y.reshape(-1)
    return lambda: fn(case.W, h, y).backward()
