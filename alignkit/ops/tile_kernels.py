"""Per-tile elementwise work, one implementation per CPU backend, behind one interface.

    fold(tile, targets, col0, stats, opts)
        tile    [r, c] raw logits x (fp32 or bf16; row stride free, unit column stride)
        targets [r] int64 global label ids; a target outside [col0, col0 + c) is left alone
        stats   RowStats: running max m, Σexp(z−m) s, Σexp(z−m)·(z−m) a (or None), target logit tgt
    grad(tile, out, targets, col0, lse2, g_lp, ent, g_ent, opts)
        lse2 [r, 2] is (m, log s): lse kept in two parts so that z − lse = (z − m) − log s stays
        exact for logits of magnitude 1e3 (lse alone would carry an absolute error of ~1e-4).
        writes dL/dx into out (fp32, may be tile itself):
        dz = g_lp·(onehot − p) − g_ent·p·(z − lse + ent),  p = exp(z − lse),  dx = dz·dz/dx

with z = softcap·tanh(x/softcap)/T (or x/T without a softcap). "cpp" is one fused pass in
csrc/logprob_kernels.cpp; "torch" is the same arithmetic in torch ops (the fallback).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.ops.backends import cpp_module
from alignkit.ops.options import LogprobArgs


@dataclass
class RowStats:
    m: torch.Tensor
    s: torch.Tensor
    a: torch.Tensor | None
    tgt: torch.Tensor

    @classmethod
    def new(cls, rows: int, entropy: bool, device) -> "RowStats":
        f = dict(dtype=torch.float32, device=device)
        return cls(
            m=torch.full((rows,), float("-inf"), **f),
            s=torch.zeros(rows, **f),
            a=torch.zeros(rows, **f) if entropy else None,
            tgt=torch.zeros(rows, **f),
        )

    def lse2(self) -> torch.Tensor:
        return torch.stack([self.m, self.s.log()], 1)

    def logprob(self) -> torch.Tensor:
        return (self.tgt - self.m) - self.s.log()

    def entropy(self) -> torch.Tensor:
        # H = lse − E_p[z] = log s − E_p[z − m] = log s − a/s: both terms O(log V), no cancellation
        # between two numbers of the logits' magnitude.
        return self.s.log() - self.a / self.s


# z − m is clamped below at −1e4, where exp is exactly 0 in fp32: a −inf logit (masked by the
# bias) then adds 0·(−1e4) = 0 to the entropy and its gradient instead of 0·(−inf) = NaN
# (0·log 0 = 0). clamp keeps NaN, so NaN still follows IEEE arithmetic.
_ZM_MIN = -1e4


def _z(tile: torch.Tensor, opts: LogprobArgs) -> torch.Tensor:
    z = tile.float()
    if opts.softcap is not None:
        z = z if z is not tile else z.clone()
        z.div_(opts.softcap).tanh_().mul_(opts.softcap)
    if opts.temperature != 1.0:
        z = z if z is not tile else z.clone()
        z.mul_(opts.inv_temp)
    return z


def _local(targets: torch.Tensor, col0: int, cols: int):
    loc = targets - col0
    hit = (loc >= 0) & (loc < cols)
    return loc.clamp(0, cols - 1), hit


# ----------------------------------------------------------------------------------------- torch
def fold_torch(tile, targets, col0, st: RowStats, opts: LogprobArgs):
    z = _z(tile, opts)
    m_new = torch.maximum(st.m, z.amax(dim=1))
    # a block of −inf logits only: shift by 0 (no −inf − (−inf)); the rescale drops its sums
    m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)
    zm = (z - m_ref[:, None]).clamp_(min=_ZM_MIN)
    e = torch.exp(zm)
    first = st.m == float("-inf")
    scale = torch.where(first, 0.0, torch.exp(st.m - m_new))
    if st.a is not None:
        shift = torch.where(first, 0.0, (st.m - m_new) * st.s)
        st.a.add_(shift).mul_(scale).add_((e * zm).sum(1))
    st.s.mul_(scale).add_(e.sum(1))
    st.m.copy_(m_new)
    loc, hit = _local(targets, col0, tile.shape[1])
    st.tgt.copy_(torch.where(hit, z.gather(1, loc[:, None]).squeeze(1), st.tgt))


def grad_torch(tile, out, targets, col0, lse2, g_lp, ent, g_ent, opts: LogprobArgs):
    zm = (_z(tile, opts) - lse2[:, :1]).clamp_(min=_ZM_MIN)
    logs = lse2[:, 1:]
    p = torch.exp(zm - logs)
    d = p * (-g_lp)[:, None]
    if g_ent is not None:
        d -= g_ent[:, None] * p * (zm - (logs - ent[:, None]))
    loc, hit = _local(targets, col0, tile.shape[1])
    d.scatter_add_(1, loc[:, None], torch.where(hit, g_lp, 0.0)[:, None])
    if opts.softcap is not None:
        t = tile.float() / opts.softcap
        d *= 1.0 - torch.tanh(t) ** 2
    if opts.temperature != 1.0:
        d *= opts.inv_temp
    out.copy_(d)


# ------------------------------------------------------------------------------------------- cpp
def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check_tile(tile: torch.Tensor):
    if tile.dtype not in (torch.float32, torch.bfloat16) or tile.stride(1) != 1:
        raise ValueError(f"cpp tile must be fp32/bf16 with unit column stride, got {tile.dtype} "
                         f"strides {tile.stride()}")


def fold_cpp(tile, targets, col0, st: RowStats, opts: LogprobArgs):
    _check_tile(tile)
    cpp_module().fold(
        _ptr(tile), _ptr(targets), _ptr(st.m), _ptr(st.s), _ptr(st.a), _ptr(st.tgt),
        tile.shape[0], tile.shape[1], tile.stride(0), col0, tile.dtype == torch.bfloat16,
        opts.inv_temp, opts.cap, torch.get_num_threads(),
    )


def grad_cpp(tile, out, targets, col0, lse2, g_lp, ent, g_ent, opts: LogprobArgs):
    _check_tile(tile)
    if out.dtype != torch.float32 or out.stride(1) != 1 or out.shape != tile.shape:
        raise ValueError("cpp grad output must be fp32 [rows, cols] with unit column stride")
    bf16 = tile.dtype == torch.bfloat16
    m, logs = lse2[:, 0].contiguous(), lse2[:, 1].contiguous()
    if not bf16 and out.data_ptr() != tile.data_ptr():
        out.copy_(tile)
        tile = out
    cpp_module().grad(
        _ptr(tile), _ptr(out), _ptr(targets), _ptr(m), _ptr(logs), _ptr(g_lp),
        _ptr(ent if g_ent is not None else None), _ptr(g_ent), tile.shape[0], tile.shape[1],
        tile.stride(0), out.stride(0), col0, bf16, opts.inv_temp, opts.cap,
        torch.get_num_threads(),
    )


KERNELS = {"torch": (fold_torch, grad_torch), "cpp": (fold_cpp, grad_cpp)}
# tile-sized fp32 buffers alive at once inside fold/grad (tiling.plan divides the budget by it)
LIVE_TILES = {"torch": 6, "cpp": 1}
