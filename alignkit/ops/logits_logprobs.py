"""Log-probs from given logits [..., V], a row chunk at a time.

Forward reads the logits in place (cpp: fp32 and bf16 rows folded directly, no copy; torch: one
fp32 chunk of ``row_plan`` rows at a time), so no second [N, V] fp32 tensor is made. Backward writes
exactly one [N, V] gradient, in the logits' dtype, filled chunk by chunk.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.ops import tiling, triton_path
from alignkit.ops.backends import resolve
from alignkit.ops.linear_logprobs import _opts
from alignkit.ops.options import LogprobArgs, materialize_grads
from alignkit.ops.tile_kernels import KERNELS, LIVE_TILES, RowStats
from alignkit.ops.validate import check_float, check_label_range, check_labels, check_same_device

_EMPTY = (0,)


def _rows2d(logits: Tensor) -> Tensor:
    """[N, V] view with unit column stride; copies only if the layout makes a view impossible."""
    V = logits.shape[-1]
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    try:
        return x.view(-1, V)
    except RuntimeError:
        return x.reshape(-1, V)  # documented: a copy for layouts that cannot be flattened


def _kernel_view(chunk: Tensor, backend: str) -> Tensor:
    if backend == "cpp" and chunk.dtype in (torch.float32, torch.bfloat16):
        return chunk
    return chunk.float()


def forward_impl(logits: Tensor, labels: Tensor, opts: LogprobArgs, backend: str):
    x = _rows2d(logits)
    N, V = x.shape
    y = labels.reshape(-1).long()
    check_label_range(y, V, opts.ignore_index)
    keep = y != opts.ignore_index
    f32 = dict(dtype=torch.float32, device=logits.device)
    lp = torch.zeros(N, **f32)
    lse = torch.zeros(N, 2, **f32)
    ent = torch.zeros(N if opts.return_entropy else 0, **f32)
    if backend == "triton":
        lp_t, m, logs, ent_t = triton_path.logits_forward(x, y.contiguous(), opts.inv_temp,
                                                          opts.ignore_index)
        return lp_t, (ent_t if opts.return_entropy else ent), torch.stack([m, logs], 1)
    fold, _ = KERNELS[backend]
    R = tiling.row_plan(N, V, opts.tiles.tile_bytes, live_tiles=LIVE_TILES[backend])
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        st = RowStats.new(r1 - r0, opts.return_entropy, logits.device)
        fold(_kernel_view(x[r0:r1], backend), y[r0:r1].contiguous(), 0, st, opts)
        k = keep[r0:r1]
        lp[r0:r1] = torch.where(k, st.logprob(), 0.0)
        lse[r0:r1] = st.lse2()
        if opts.return_entropy:
            ent[r0:r1] = torch.where(k, st.entropy(), 0.0)
    return lp, ent, lse


def backward_impl(grad_lp: Tensor, grad_ent, logits: Tensor, labels: Tensor, lse: Tensor, entropy,
                  opts: LogprobArgs, backend: str) -> Tensor:
    x = _rows2d(logits)
    N, V = x.shape
    y = labels.reshape(-1).long()
    keep = (y != opts.ignore_index).float()
    g = grad_lp.reshape(-1).float() * keep
    ge = grad_ent.reshape(-1).float() * keep if grad_ent is not None else None
    ent = entropy.reshape(-1) if ge is not None else None
    out = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    if backend == "triton":
        triton_path.logits_backward(x, out, y.contiguous(), lse[:, 0].contiguous(),
                                    lse[:, 1].contiguous(), g, ent, ge, opts.inv_temp)
        return out.view(logits.shape)
    _, grad = KERNELS[backend]
    R = tiling.row_plan(N, V, opts.tiles.tile_bytes, live_tiles=LIVE_TILES[backend])
    scratch = None
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        src = _kernel_view(x[r0:r1], backend)
        if out.dtype == torch.float32:
            dst = out[r0:r1]  # fp32: the gradient is written straight into the output
        else:
            if scratch is None:
                scratch = torch.empty(R, V, dtype=torch.float32, device=logits.device)
            dst = scratch[: r1 - r0]
        grad(src, dst, y[r0:r1].contiguous(), 0, lse[r0:r1], g[r0:r1], ent[r0:r1] if ent is not None
             else None, ge[r0:r1] if ge is not None else None, opts)
        if dst.data_ptr() != out[r0:r1].data_ptr():
            out[r0:r1].copy_(dst)
    return out.view(logits.shape)


@torch.library.custom_op("alignkit::logits_logprobs_fwd", mutates_args=())
def _fwd_op(logits: Tensor, labels: Tensor, ignore_index: int, temperature: float,
            return_entropy: bool, backend: str, tile_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    opts = _opts(ignore_index, temperature, 0.0, return_entropy, backend, tile_bytes, None)
    lp, ent, lse = forward_impl(logits, labels, opts, backend)
    shape = labels.shape
    return (lp.view(shape), (ent.view(shape) if return_entropy else ent),
            lse.view(*shape, 2))


@_fwd_op.register_fake
def _(logits, labels, ignore_index, temperature, return_entropy, backend, tile_bytes):
    f = dict(dtype=torch.float32)
    return (labels.new_empty(labels.shape, **f),
            labels.new_empty(labels.shape if return_entropy else _EMPTY, **f),
            labels.new_empty((*labels.shape, 2), **f))


@torch.library.custom_op("alignkit::logits_logprobs_bwd", mutates_args=())
def _bwd_op(grad_lp: Tensor, grad_ent: Optional[Tensor], logits: Tensor, labels: Tensor,
            lse: Tensor, entropy: Optional[Tensor], ignore_index: int, temperature: float,
            backend: str, tile_bytes: int) -> Tensor:
    opts = _opts(ignore_index, temperature, 0.0, entropy is not None, backend, tile_bytes, None)
    return backward_impl(grad_lp, grad_ent, logits, labels, lse.reshape(-1, 2), entropy, opts, backend)


@_bwd_op.register_fake
def _(grad_lp, grad_ent, logits, labels, lse, entropy, ignore_index, temperature, backend,
      tile_bytes):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, temperature, return_entropy, backend, tile_bytes = inputs
    _, ent, lse = output
    ctx.save_for_backward(logits, labels, lse, ent if return_entropy else None)
    ctx.args = (ignore_index, temperature, backend, tile_bytes)


def _backward(ctx, grad_lp, grad_ent, _grad_lse):
    logits, labels, lse, ent = ctx.saved_tensors
    ignore_index, temperature, backend, tile_bytes = ctx.args
    grad_lp, grad_ent = materialize_grads(grad_lp, grad_ent, lse, ent)
    g = _bwd_op(grad_lp, grad_ent, logits, labels, lse, ent, ignore_index, temperature, backend,
                tile_bytes)
    return g, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def logits_logprobs(logits: Tensor, labels: Tensor, *, opts: LogprobArgs):
    """Launcher: validates, resolves the backend, calls the op. Returns (logprobs, entropy|None)."""
    check_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., V], got a 0-dim tensor")
    check_labels(labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device(logits=logits, labels=labels)
    if opts.softcap is not None:
        raise ValueError("softcap applies to linear_token_logprobs only; cap the logits yourself")
    backend = resolve(opts.backend, logits.device)
    lp, ent, _ = _fwd_op(logits, labels, opts.ignore_index, float(opts.temperature),
                         opts.return_entropy, backend, opts.tiles.resolved().tile_bytes)
    return lp, (ent if opts.return_entropy else None)
