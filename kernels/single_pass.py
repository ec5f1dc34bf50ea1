"""Triton kernel of the single-pass losses (alignkit/losses/single_pass.py) on the GPU path.

_tile_lp_grad  grid (rows,): one program per row of a [rows, V] logits tile that a vendor GEMM
               wrote (raw logits x = h·Wᵀ + b, fp32, bf16 or fp16; row stride free).
               Pass 1 reads the row once: online log-sum-exp of z = softcap·tanh(x/softcap)/T
               and the target's z, so the token's log-prob. Pass 2 (WRITE_GRAD) reads it again
               and writes G = w_t·(onehot − p)·dz/dx over it, in place and in the tile's dtype
               (each element is read before the same program overwrites it). The launcher then
               hands G to the two vendor GEMMs (G·W, Gᵀ·h). Per row: two reads and one write,
               fp32 arithmetic whatever the tile's dtype. Offsets are int64 (rows·V can exceed
               2³¹); the last vocab block is masked.
"""
import triton
import triton.language as tl

from .linear_logprobs import _transform


@triton.jit
def _tile_lp_grad(x_ptr, y_ptr, w_ptr, lp_ptr,
                  N, V,
                  stride_xn,
                  inv_temp, softcap,
                  HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_xn
    y = tl.load(y_ptr + row).to(tl.int64)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
        z, _ = _transform(x, inv_temp, softcap, HAS_SOFTCAP)
        z = tl.where(cmask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        t += tl.sum(tl.where(cols == y, z, 0.0), 0)
        m = m_new
    logs = tl.log(s)
    tl.store(lp_ptr + row, (t - m) - logs)
    if WRITE_GRAD:
        w = tl.load(w_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            cmask = cols < V
            x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
            z, dzdx = _transform(x, inv_temp, softcap, HAS_SOFTCAP)
            p = tl.exp((z - m) - logs)
            d = w * (tl.where(cols == y, 1.0, 0.0) - p) * dzdx
            tl.store(base + cols, d.to(x_ptr.dtype.element_ty), mask=cmask)
