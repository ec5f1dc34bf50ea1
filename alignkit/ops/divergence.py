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

The tile is two [rows, V] buffers (the two heads' logits), worked a vocab block at a time so
every elementwise step reads cache, not memory: the log-sum-exps are folded online while each
block of logits is fresh from its GEMM (fold_lse), then tile_divergence sweeps the stored tile
once (beta = 0: D and G together) or twice (the row sums D and KL(p_s ‖ m) must be complete
before G). Its temporaries are three [rows, block] buffers.
"""
from __future__ import annotations

import math

import torch

LIVE_TILES = 2          # [rows, V] buffers of a tile: the student's and the teacher's logits


def grad_factor(beta: float) -> float:
    """The constant tile_divergence leaves out of G: ∂D/∂z_s = grad_factor(beta)·G. The caller
    puts it, with the loss weight and 1/temperature, on the [rows, H] side of the gradient
    GEMMs, not on the [rows, V] tile (one pass over the tile fewer)."""
    return 1.0 - beta if 0.0 < beta < 1.0 else 1.0


def fold_lse(blk, m, acc, tmp):
    """Online log-sum-exp over vocab blocks: folds blk [rows, b] into the running max m and
    Σ exp(z − m) acc [rows] (start at −inf and 0); tmp: a [rows, ≥ b] buffer. Rows are finite
    (GEMM outputs). log-sum-exp = m + log(acc), kept as the pair (m, log(acc)): z − m first,
    then − log(acc), is exact to an ulp of log p where z − (m + log acc) would lose the digits
    of a large max (logits of 300: ~3e-5)."""
    m_new = torch.maximum(m, blk.amax(-1))
    acc.mul_(torch.exp(m - m_new))
    t = tmp[:, :blk.shape[1]]
    torch.sub(blk, m_new[:, None], out=t)
    acc.add_(t.exp_().sum(-1))
    m.copy_(m_new)


def _rowdot(a, b):
    """Σ_v a·b per row [rows], without a [rows, V] product."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def tile_divergence(zs, zt, lse_s, lse_t, beta: float, grad: bool, block: int, tmps):
    """(D [rows], entropy of p_s [rows], G or None) of one tile.

    zs, zt: the student's and teacher's logits / temperature [rows, V] (overwritten); lse_s,
    lse_t: their log-sum-exps as pairs (max, log Σ exp(z − max)) of [rows] (fold_lse); tmps:
    three [rows, ≥ block] buffers of their dtype. grad: G with ∂D/∂z_s = grad_factor(beta)·G
    is formed in zs (beta = 0) or zt and returned."""
    n, V = zs.shape
    ent = torch.zeros(n, dtype=zs.dtype, device=zs.device)
    ka, kb = torch.zeros_like(ent), torch.zeros_like(ent)    # the row sums D is made of
    jsd = 0.0 < beta < 1.0
    c_s, c_t = (math.log1p(-beta), math.log(beta)) if jsd else (0.0, 0.0)
    blocks = [(v0, min(V, v0 + block)) for v0 in range(0, V, block)]
    # sweep 1: s and t in place, the entropy and the row sums; for beta = 0 also G
    for v0, v1 in blocks:
        s, t = zs[:, v0:v1], zt[:, v0:v1]
        ps, pt, lm = (x[:, :v1 - v0] for x in tmps)
        s.sub_(lse_s[0][:, None]).sub_(lse_s[1][:, None])
        t.sub_(lse_t[0][:, None]).sub_(lse_t[1][:, None])
        torch.exp(s, out=ps)
        ent.sub_(_rowdot(ps, s))
        if beta == 0.0:                    # D = Σ p_t (t − s);  G = p_s − p_t
            torch.exp(t, out=pt)
            t.sub_(s)
            ka.add_(_rowdot(pt, t))
            if grad:
                torch.sub(ps, pt, out=s)
        elif beta == 1.0:                  # D = Σ p_s (s − t); t becomes s − t for sweep 2
            torch.sub(s, t, out=t)
            ka.add_(_rowdot(ps, t))
        else:                              # ka = KL(p_t ‖ m), kb = KL(p_s ‖ m)
            torch.exp(t, out=pt)
            # logaddexp(s + c_s, t + c_t) = logaddexp(s + c_s − c_t, t) + c_t
            torch.add(s, c_s - c_t, out=lm)
            torch.logaddexp(lm, t, out=lm)
            lm.add_(c_t)
            t.sub_(lm)
            ka.add_(_rowdot(pt, t))
            torch.sub(s, lm, out=t)        # t's slot: s − log m; s stays for sweep 2's p_s
            kb.add_(_rowdot(ps, t))
    d = ka if not jsd else beta * ka + (1.0 - beta) * kb
    if not grad or beta == 0.0:
        return d, ent, (zs if grad else None)
    # sweep 2: G, once the row sums are complete
    for v0, v1 in blocks:
        ps = tmps[0][:, :v1 - v0]
        # zs holds s; zt holds s − t (beta = 1) or s − log m (JSD): G into zt
        torch.exp(zs[:, v0:v1], out=ps)
        zt[:, v0:v1].sub_((d if beta == 1.0 else kb)[:, None]).mul_(ps)
    return d, ent, zt
