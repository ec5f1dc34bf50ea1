"""``alignkit bench --loss distill``: alignkit.distill_loss against TRL 1.16's chunked divergence
and Liger's fused linear JSD, beside the 4-GEMM floor.

The case's head is the student's; the teacher is a second head of the same hidden size (seeded
here, no gradient). Every method computes the generalized JSD at BETA, mean over the labelled
tokens (the case's prompt positions are ignored):
    alignkit            distill_loss (its plan: TileOptions, the bench's --memory / --plan)
    TRL                 trl.trainer.distillation_trainer._chunked_divergence_loss, the function
                        DistillationTrainer calls (ChunkedDivergenceFunction inside: two passes
                        over the vocabulary in forward for the JSD, one more in backward)
    Liger               liger_kernel's LigerFusedLinearJSD (Triton kernels: CUDA only)
    naive full logits   the float64 oracle's definition on the case's dtype (full [N, V] logits)
The floor: the four GEMMs no fused distillation avoids over the labelled tokens, h_s·W_sᵀ,
h_t·W_tᵀ, G·W_s and Gᵀ·h_s.
"""
from __future__ import annotations

import torch

import alignkit
from alignkit.testing.oracle import oracle_distill_loss

FLOOR4 = "GEMM floor (4 GEMMs)"
BETA = 0.5


def teacher(case, seed: int = 1):
    """(hidden [S, T, H], weight [V, H]) of the teacher, in the case's dtype, no gradient."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(case.S, case.T, case.H, generator=g).to(case.h.dtype)
    W = (torch.randn(case.V, case.H, generator=g) / case.H ** 0.5).to(case.W.dtype)
    return h.to(case.h.device), W.to(case.W.device)


def floor4(case, t):
    hs, ht = case.h.detach()[case.mask], t[0][case.mask]
    Ws, Wt = case.W.detach(), t[1]
    G = torch.randn(hs.shape[0], case.V, dtype=hs.dtype, device=hs.device)

    def step():
        torch.mm(hs, Ws.t())
        torch.mm(ht, Wt.t())
        torch.mm(G, Ws)
        torch.mm(G.t(), hs)
    return step


def _alignkit(case, t, tiles, name):
    from alignkit.bench.methods import settled
    return settled(name, lambda: alignkit.distill_loss(case.h, case.W, t[0], t[1], case.y,
                                                       beta=BETA, tiles=tiles)[0].backward())


def _trl(case, t):
    import trl.trainer.distillation_trainer as dt

    from alignkit.integrations.trl_distill import _ORIGINAL
    fn = _ORIGINAL.get("fn", dt._chunked_divergence_loss)   # TRL's own, if a patch hooked it
    mask = case.mask.long()
    return lambda: fn(case.h, t[0], case.W, t[1], mask, BETA)[0].backward()


def _liger(case, t):
    if case.h.device.type != "cuda":
        raise NotImplementedError("LigerFusedLinearJSD runs Triton kernels on CUDA only")
    from liger_kernel.transformers import LigerFusedLinearJSD
    fn = LigerFusedLinearJSD(jsd_beta=BETA)
    hs, ht, y = case.h.reshape(-1, case.H), t[0].reshape(-1, case.H), case.y.reshape(-1)
    return lambda: fn(hs, case.W, ht, t[1], y).backward()


def _naive(case, t):
    return lambda: oracle_distill_loss(case.h, case.W, t[0], t[1], case.y,
                                       beta=BETA)[0].backward()


def distill_steps(case, tiles=None, peers=None):
    """(steps, skipped) as methods.steps_for gives them, for --loss distill; the floor first."""
    from alignkit.bench.methods import CHOSEN, LIGER, missing
    CHOSEN.clear()
    t = teacher(case)
    name = "alignkit distill_loss"
    steps = {FLOOR4: floor4(case, t), name: _alignkit(case, t, tiles, name)}
    skipped = {}
    peer_list = (("naive full logits", _naive, None, None),
                 ("TRL chunked divergence", _trl, "trl", "trl"),
                 ("Liger LigerFusedLinearJSD", _liger, LIGER[0], LIGER[1]))
    for pname, setup, module, pip in peer_list:
        if peers is not None and not any(x.lower() in pname.lower() for x in peers):
            continue
        if missing(module):
            skipped[pname] = f"not installed: pip install {pip}"
            continue
        try:
            steps[pname] = setup(case, t)
        except (NotImplementedError, ImportError) as e:
            skipped[pname] = str(e)
    return steps, skipped
