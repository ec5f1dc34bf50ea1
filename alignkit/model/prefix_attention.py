"""Causal attention of a sequence's last R queries over a shared prefix and their own keys, with
no mask: two flash-attention calls, one per key block, merged by their log-sum-exp.

shared_prompt's rejected response (alignkit.model.attention): its R queries sit at positions
P .. P+R-1 of the sequence [prompt (P), response (R)]. Causal attention over that sequence is

    o = softmax([q·Kpᵀ, q·Krᵀ + causal] · scale) · [Vp; Vr]

Split by key block, every prompt key is visible (no mask) and the response's own keys are plain
top-left causal (query i sees own keys 0..i):

    o_p, l_p = attn(q, Kp, Vp)            o_r, l_r = attn(q, Kr, Vr, causal)
    l = logaddexp(l_p, l_r)               o = e^(l_p − l)·o_p + e^(l_r − l)·o_r

(flash attention's blockwise softmax; ring attention merges its blocks the same way). Backward:
flash attention's backward of one key block needs dO, the block's q, k, v and the *final* output
o and log-sum-exp l (P = exp(S·scale − l), D = rowsum(dO ∘ o)), so each block's backward, given
the merged o and l, returns that block's exact share; dq = dq_p + dq_r.

Cost: R·P + R²/2 scores, against R·(P + R) under a bottom-right causal mask (the CPU flash kernel
computes every masked block whole, and SDPA keeps the [R, P + R] mask for backward) and
(P + R)²/2 when the prompt's queries run again. What that buys fwd+bwd against both, per
machine class: ``python -m bench.prefix_attention --write`` (bench/HISTORY.md, "shared_prompt's
rejected response merged over its prompt"). Where P is one key block of the CPU kernel (512), the
own causal block is computed whole and the merge runs level with the mask.

CPU only: torch's CPU flash kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``) returns
its log-sum-exp, and takes GQA's fewer key/value heads as they are. Shapes: q [B, Hq, R, D];
kp, vp [B, Hkv, P, D]; k, v [B, Hkv, R, D] -> [B, Hq, R, D].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def applies(q: Tensor, dropout: float, softcap: Optional[float], window: Optional[int],
            keys: int) -> bool:
    """Whether prefix_causal can serve this call: a CPU tensor of a dtype the CPU flash kernel
    takes, at least one query (the kernel divides by zero on none), no dropout (each call would
    draw its own mask, which its backward does not see), no softcap (applied to the scores
    inside one softmax) and no sliding window shorter than the sequence's `keys`."""
    return (q.device.type == "cpu" and q.dtype in _DTYPES and q.shape[2] > 0 and not dropout
            and softcap is None and (window is None or window >= keys))


class _PrefixCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kp, vp, k, v, scale):
        fa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o_p, l_p = fa(q, kp, vp, 0.0, False, scale=scale)
        o_r, l_r = fa(q, k, v, 0.0, True, scale=scale)
        lse = torch.logaddexp(l_p, l_r)                            # fp32 [B, Hq, R]
        w_p, w_r = (torch.exp(x - lse).unsqueeze(-1) for x in (l_p, l_r))
        if q.dtype in (torch.float32, torch.float64):
            o = o_p * w_p.to(q.dtype) + o_r * w_r.to(q.dtype)
        else:                                 # merge the low-precision halves in fp32
            o = (o_p.float() * w_p + o_r.float() * w_r).to(q.dtype)
        ctx.scale = scale
        ctx.save_for_backward(q, kp, vp, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, grad):
        q, kp, vp, k, v, o, lse = ctx.saved_tensors
        fab = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad = grad.contiguous()
        dq_p, dkp, dvp = fab(grad, q, kp, vp, o, lse, 0.0, False, scale=ctx.scale)
        dq_r, dk, dv = fab(grad, q, k, v, o, lse, 0.0, True, scale=ctx.scale)
        return dq_p.add_(dq_r), dkp, dvp, dk, dv, None


def prefix_causal(q: Tensor, kp: Tensor, vp: Tensor, k: Tensor, v: Tensor,
                  scale: float) -> Tensor:
    """q's causal attention over [prefix, own] keys and values (module docstring); check
    ``applies`` first. Under CPU autocast the five inputs are cast to its dtype, as
    ``F.scaled_dot_product_attention`` (on autocast's lower-precision list) casts them."""
    if torch.is_autocast_enabled("cpu"):
        dt = torch.get_autocast_dtype("cpu")
        q, kp, vp, k, v = (t.to(dt) for t in (q, kp, vp, k, v))
        with torch.autocast("cpu", enabled=False):
            return _PrefixCausal.apply(q, kp, vp, k, v, scale)
    return _PrefixCausal.apply(q, kp, vp, k, v, scale)


__all__ = ["applies", "prefix_causal"]
