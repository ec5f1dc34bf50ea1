"""The pair pass (single_pass._grads) as a torch.library custom op, so torch.compile traces it.

Eager calls run single_pass._SinglePass, whose backward scales the gradients formed in forward in
place (no second [V, H] buffer). torch.compile cannot trace that pass: its loops and its choices
(the unscaled group, the kept rows) read the data. Under torch.compile, preference_loss calls this
op instead. It is one opaque node with a fake implementation:
- Its outputs are the loss, the sequences' sums and counts, and the gradients themselves
  (fp32; an empty tensor for a gradient not needed).
- Its backward returns the gradients times the upstream scalar, out of place. The graph holds
  them as saved activations, so backward holds a second grad_W for a moment. That is the price of
  tracing; the eager path has no such copy.
A custom op takes tensors and plain values only, so the loss travels by name. The spec string
holds the loss's registry name, its options as a Python literal, the reduction, the sequence
count and the LogprobOptions fields. From it the op rebuilds the same SinglePassOptions
(pass_options) as the eager path.

Shapes: hidden [2B, T, H] or [N, H], labels and seg (each token's sequence in [0, S)) the
tokens' shape, ref [S] or None.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from alignkit.losses import single_pass
from alignkit.losses.registry import LOSSES as REGISTRY
from alignkit.losses.registry import paired_loss_on_logps
from alignkit.ops.options import LogprobOptions, TileOptions


def pair_loss_fn(loss: str, own: dict, average: bool, ref: Optional[Tensor]):
    """loss_fn(logps [S], counts [S]) -> (loss, metrics): the recompute path's loss on the S
    log-probs (differentiable in logps)."""
    def loss_fn(logps, counts):
        sums = logps * counts if average else logps
        return paired_loss_on_logps(loss, logps, sums, counts, ref, own)
    return loss_fn


def pass_options(loss: str, own: dict, common: dict, average: bool, S: int, weight: Tensor,
                 ref: Optional[Tensor]) -> single_pass.SinglePassOptions:
    """The pair pass's options for this loss and head: its loss_fn, the tie, the tile rows and
    the keep budget (eager and compiled paths alike)."""
    loss_fn = pair_loss_fn(loss, own, average, ref)
    lp_opts = LogprobOptions(**common)
    V, H = weight.shape
    o = single_pass.SinglePassOptions(
        loss_fn, S, average, REGISTRY[loss].tie(own, S // 2), lp_opts,
        single_pass.tile_rows(V, weight.device, weight.dtype, lp_opts.tiles, H=H,
                              backend=lp_opts.backend),
        lp_opts.tiles.resolved().vocab_block,
        single_pass.keep_rows(V, H, weight.device, weight.dtype, lp_opts.tiles, lp_opts.backend))
    return o


_TILE_FIELDS = tuple(f.name for f in dataclasses.fields(TileOptions))


@torch.compiler.assume_constant_result
def spec_of(loss: str, own: tuple, common: tuple, tiles: Optional[tuple], average: bool,
            S: int) -> str:
    """The op's spec string (a Python literal: ast.literal_eval gives it back), run once at trace
    time. own and common as (name, value) tuples, tiles as the TileOptions' field values."""
    com = dict(common)
    if tiles is not None:
        com["tiles"] = dict(zip(_TILE_FIELDS, tiles))
    d = dict(loss=loss, own=dict(own), common=com, average=average, S=S)
    spec = repr(d)
    if ast.literal_eval(spec) != d:
        raise ValueError(f"the options of loss {loss!r} do not round-trip as Python literals "
                         "under torch.compile; call it eagerly, or with grad_mode='recompute'")
    return spec


def _unspec(spec: str):
    d = ast.literal_eval(spec)
    if "tiles" in d["common"]:
        d["common"]["tiles"] = TileOptions(**d["common"]["tiles"])
    return d


@torch.library.custom_op("alignkit::pair_pass", mutates_args=())
def pair_pass(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], seg: Tensor,
              ref: Optional[Tensor], spec: str, need_h: bool, need_w: bool,
              need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    d = _unspec(spec)
    o = pass_options(d["loss"], d["own"], d["common"], d["average"], d["S"], weight, ref)
    # _grads checks the label range first, in its one host read
    loss, sums, counts, gh, gw, gb = single_pass._grads(hidden, weight, labels.long(), bias,
                                                        seg.long(), o, need_h, need_w, need_b)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (loss.reshape(()).clone(), sums, counts,
            *(g if g is not None else torch.empty(0, **f32) for g in (gh, gw, gb)))


@pair_pass.register_fake
def _(hidden, weight, labels, bias, seg, ref, spec, need_h, need_w, need_b):
    S = ast.literal_eval(spec)["S"]
    V, H = weight.shape
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((), **f32), hidden.new_empty((S,), **f32),
            labels.new_empty((S,), dtype=torch.int64),
            hidden.new_empty((hidden.numel() // H, H) if need_h else (0,), **f32),
            hidden.new_empty((V, H) if need_w else (0,), **f32),
            hidden.new_empty((V,) if need_b else (0,), **f32))


def _setup_context(ctx, inputs, output):
    hidden, weight, _, bias = inputs[:4]
    ctx.need = inputs[7:10]
    ctx.meta = (hidden.shape, hidden.dtype, weight.dtype,
                bias.dtype if bias is not None else None)
    ctx.save_for_backward(*output[3:])


def _backward(ctx, grad_loss, _g_sums, _g_counts, _gh, _gw, _gb):
    gh, gw, gb = ctx.saved_tensors
    need_h, need_w, need_b = ctx.need
    shape, hdt, wdt, bdt = ctx.meta
    s = grad_loss.to(torch.float32)
    return ((gh * s).view(shape).to(hdt) if need_h else None,
            (gw * s).to(wdt) if need_w else None, None,
            (gb * s).to(bdt) if need_b else None) + (None,) * 6


pair_pass.register_autograd(_backward, setup_context=_setup_context)


def compiled_pair_pass(loss, own, common, average, S, hidden, weight, labels, bias, seg, ref):
    """preference_loss's single pass under torch.compile: (loss, metrics), as the eager
    fused._single_pass returns them."""
    grad = torch.is_grad_enabled()
    need = (grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)
    t = common.get("tiles")
    spec = spec_of(loss, tuple(own.items()),
                   tuple((k, v) for k, v in common.items() if k != "tiles"),
                   None if t is None else tuple(getattr(t, n) for n in _TILE_FIELDS), average, S)
    value, sums, counts, *_ = pair_pass(hidden, weight, labels, bias, seg, ref, spec, *need)
    loss_fn = pair_loss_fn(loss, own, average, ref)
    counts_f = counts.to(sums.dtype)
    sums = sums.detach()
    logps = sums / counts_f.clamp(min=1) if average else sums
    _, metrics = loss_fn(logps, counts_f)
    return value, metrics
