"""The generalized Jensen-Shannon divergence of one tile of rows, and its gradient with respect to
the student's logits: the math of alignkit.distill_loss, stated once (alignkit/ops/distill_pass.py
drives it over full-vocabulary tiles; alignkit/oracle.py holds the float64 definition it is tested
against).

TRL 1.16's definition (trl/kernels/chunked_divergence.py), with s = log p_s and t = log p_t the
student's and teacher's log-softmax of logits / temperature over the full vocabulary:

    beta = 0      D = KL(p_t ‖ p_s) = Σ_v p_t (t − s)                         (forward KL)
    beta = 1      D = KL(p_s ‖ p_t) = Σ_v p_s (s − t)                         (reverse KL)
    0 < beta < 1  m = (1 − β)·p_s + β·p_t,  log m = logaddexp(s + log(1 − β), t + log β)
                  D = β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m)                     (generalized JSD;
                  Agarwal et al. 2024, "On-Policy Distillation of Language Models", GKD)

and the gradient with respect to the student's scaled logits z_s = logits_s / temperature:

    beta = 0      ∂D/∂z_s = p_s − p_t
    beta = 1      ∂D/∂z_s = p_s·(s − t − D)
    0 < beta < 1  ∂D/∂z_s = (1 − β)·p_s·(s − log m − KL(p_s ‖ m))

(the β·KL(p_t ‖ m) term and the log m inside (1 − β)·KL(p_s ‖ m) cancel: Σ_k m_k ∂log m_k/∂z_j
= 0). The student's entropy −Σ p_s s comes from the same tile.

Everything runs in place on preallocated [rows, V] buffers (a fresh tile per chunk would fault its
pages in again on CPU): 4 live tiles for beta 0 or 1, 5 for the JSD (log m).
"""
from __future__ import annotations

import math

import torch


def live_tiles(beta: float) -> int:
    """[rows, V] buffers tile_divergence works in: the two logits tiles, both probabilities, and
    log m for the JSD."""
    return 4 if beta in (0.0, 1.0) else 5


def _log_softmax_(z, p):
    """z -> log softmax(z) in place; p <- softmax(z). Rows are finite (GEMM outputs)."""
    z.sub_(z.amax(-1, keepdim=True))
    torch.exp(z, out=p)
    total = p.sum(-1, keepdim=True)
    z.sub_(total.log())
    p.div_(total)


def _rowdot(a, b):
    """Σ_v a·b per row [rows], without a [rows, V] product."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def grad_factor(beta: float) -> float:
    """The constant tile_divergence leaves out of G: ∂D/∂z_s = grad_factor(beta)·G. The caller
    puts it, with the loss weight and 1/temperature, on the [rows, H] side of the gradient
    GEMMs, not on the [rows, V] tile (one pass over the tile fewer)."""
    return 1.0 - beta if 0.0 < beta < 1.0 else 1.0


def tile_divergence(zs, zt, bufs, beta: float, grad: bool = False):
    """(D [rows], entropy of p_s [rows], G or None) of one tile.

    zs, zt: the student's and teacher's logits / temperature [rows, V] (overwritten); bufs: at
    least live_tiles(beta) - 2 more [rows, V] buffers of their dtype. grad: G with ∂D/∂z_s =
    grad_factor(beta)·G is formed in one of the four buffers and returned."""
    ps, pt = bufs[0], bufs[1]
    _log_softmax_(zs, ps)                 # zs = s
    _log_softmax_(zt, pt)                 # zt = t
    ent = -_rowdot(ps, zs)
    if beta == 0.0:
        zt.sub_(zs)                       # t − s
        d = _rowdot(pt, zt)
        return d, ent, ps.sub_(pt) if grad else None
    if beta == 1.0:
        torch.sub(zs, zt, out=zt)         # s − t
        d = _rowdot(ps, zt)
        return d, ent, zt.sub_(d[:, None]).mul_(ps) if grad else None
    lm = bufs[2]
    c_s, c_t = math.log1p(-beta), math.log(beta)
    # logaddexp(s + c_s, t + c_t) = logaddexp(s + c_s − c_t, t) + c_t: one temporary-free call
    torch.add(zs, c_s - c_t, out=lm)
    torch.logaddexp(lm, zt, out=lm)
    lm.add_(c_t)
    zt.sub_(lm)                           # t − log m
    zs.sub_(lm)                           # s − log m
    kl_t, kl_s = _rowdot(pt, zt), _rowdot(ps, zs)
    d = beta * kl_t + (1.0 - beta) * kl_s
    return d, ent, zs.sub_(kl_s[:, None]).mul_(ps) if grad else None
