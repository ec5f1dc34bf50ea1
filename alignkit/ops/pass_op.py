"""The pair pass (pair_pass._grads) as a torch.library custom op, so torch.compile traces it.

Eager calls run pair_pass._SinglePass, whose backward scales the gradients formed in forward in
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
count and the LogprobArgs fields. From it the op rebuilds the same PairPassSpec as the
eager path, through the builder the losses layer registers (register_pass_builder): ops never
import losses.

Shapes: hidden [2B, T, H] or [N, H], labels and seg (each token's sequence in [0, S)) the
tokens' shape, ref [S] or None.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from alignkit.ops import pair_pass
from alignkit.ops.options import TileOptions

_BUILDER = []


def register_pass_builder(build):
    """build(loss, own, common, average, S, weight, ref) -> pair_pass.PairPassSpec: the
    losses layer's loss_fn and tie for a registry name (alignkit/losses/fused.py registers it at
    import). The custom op rebuilds its options through it from the spec string."""
    _BUILDER[:] = [build]


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
def pair_pass_op(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], seg: Tensor,
              ref: Optional[Tensor], spec: str, need_h: bool, need_w: bool,
              need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    d = _unspec(spec)
    o = _BUILDER[0](d["loss"], d["own"], d["common"], d["average"], d["S"], weight, ref)
    # _grads checks the label range first, in its one host read
    loss, sums, counts, gh, gw, gb = pair_pass._grads(hidden, weight, labels.long(), bias,
                                                        seg.long(), o, need_h, need_w, need_b)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (loss.reshape(()).clone(), sums, counts,
            *(g if g is not None else torch.empty(0, **f32) for g in (gh, gw, gb)))


@pair_pass_op.register_fake
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


pair_pass_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_pair_pass(loss, own, common, average, S, hidden, weight, labels, bias, seg, ref,
                       loss_fn):
    """preference_loss's single pass under torch.compile: (loss, metrics), as the eager
    fused._single_pass returns them. loss_fn(logps, counts) -> (loss, metrics) gives the metrics
    from the op's sums."""
    grad = torch.is_grad_enabled()
    need = (grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)
    t = common.get("tiles")
    spec = spec_of(loss, tuple(own.items()),
                   tuple((k, v) for k, v in common.items() if k != "tiles"),
                   None if t is None else tuple(getattr(t, n) for n in _TILE_FIELDS), average, S)
    value, sums, counts, *_ = pair_pass_op(hidden, weight, labels, bias, seg, ref, spec, *need)
    counts_f = counts.to(sums.dtype)
    sums = sums.detach()
    logps = sums / counts_f.clamp(min=1) if average else sums
    _, metrics = loss_fn(logps, counts_f)
    return value, metrics
