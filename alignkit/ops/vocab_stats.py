"""Per-token statistics over the whole vocabulary that alignkit's fused op does not return,
for TRL's drop-in fields: ``mean_logits`` under a soft cap, and ``log_sum_sq_probs`` (WPO).

With z_v the transformed logits of a row (z = c·tanh(x/c)/T under final_logit_softcapping c,
else x/T; x = h·W_vᵀ + b_v) and lse = log Σ_v exp(z_v) (the op's row statistics):

    mean_logits       = (1/V)·Σ_v z_v
    log_sum_sq_probs  = log Σ_v p_v² = log Σ_v exp(2·(z_v − lse))

(TRL 1.16's ChunkedLogProbFunction, trl/kernels/chunked_logprob.py: z_sum / vocab and
log(sq_sum_exp) − 2·log(sum_exp)). Without a soft cap the mean needs no logits
(h·mean(W) + mean(b), see head.py); under one, and for Σ p², every logit is needed, so this
runs one more forward GEMM over the labelled rows (N·V·H multiply-adds, no backward: both fields
carry no gradient), in [row_block x vocab_block] tiles, never the [N, V] logits at once.
The engine change that removes that GEMM: the op's forward tile loop, which already forms every
z_v to reduce lse, accumulates Σ_v z_v and Σ_v exp(2(z_v − m)) (rescaled like Σ exp(z − m))
beside it and returns them with its row statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


@torch.no_grad()
def vocab_row_stats(rows: Tensor, weight: Tensor, bias: Optional[Tensor], *, temperature: float,
                    softcap: Optional[float], lse: Optional[Tensor] = None,
                    mean: bool = False, sum_sq: bool = False, row_block: int = 1024,
                    vocab_block: int = 8192) -> dict:
    """rows [N, H], weight [V, H], bias [V] or None, in the dtypes the op met them in; lse [N]
    (log Σ exp z, for sum_sq; without it the same GEMM forms it online, see below). Returns
    {"mean_logits": [N], "log_sum_sq_probs": [N]} (those asked for), fp32 (fp64 for fp64 rows).

    Without lse, per row a running max m, s₁ = Σ exp(z − m) and s₂ = Σ exp(2(z − m)) (both
    rescaled when m grows), and log Σ p² = log s₂ − 2·log s₁: still one GEMM."""
    N, V = rows.shape[0], weight.shape[0]
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    online = sum_sq and lse is None
    inv_t = 1.0 / float(temperature)
    zsum = torch.zeros(N, dtype=acc, device=rows.device) if mean else None
    sq = torch.zeros(N, dtype=acc, device=rows.device) if sum_sq else None
    if online:
        m = torch.full((N,), float("-inf"), dtype=acc, device=rows.device)
        s1 = torch.zeros(N, dtype=acc, device=rows.device)
    for r0 in range(0, N, row_block):
        h = rows[r0:r0 + row_block]
        for v0 in range(0, V, vocab_block):
            x = (h @ weight[v0:v0 + vocab_block].T).to(acc)
            if bias is not None:
                x = x + bias[v0:v0 + vocab_block].to(acc)
            if softcap is not None:
                x = softcap * torch.tanh(x / softcap)
            z = x * inv_t
            if mean:
                zsum[r0:r0 + row_block] += z.sum(-1)
            if online:
                sl = slice(r0, r0 + row_block)
                mt = torch.maximum(m[sl], z.max(-1).values)
                d = torch.exp(m[sl] - mt)
                s1[sl] = s1[sl] * d + torch.exp(z - mt[:, None]).sum(-1)
                sq[sl] = sq[sl] * d * d + torch.exp(2 * (z - mt[:, None])).sum(-1)
                m[sl] = mt
            elif sum_sq:
                sq[r0:r0 + row_block] += torch.exp(2 * (z - lse[r0:r0 + row_block, None])).sum(-1)
    out = {}
    if mean:
        out["mean_logits"] = zsum / V
    if sum_sq:
        out["log_sum_sq_probs"] = torch.log(sq) - 2 * torch.log(s1) if online else torch.log(sq)
    return out
