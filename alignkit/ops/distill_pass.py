"""The distillation pass: alignkit.distill_loss's launcher (validation, plan, autograd, tiling).

Each chunk of labelled rows is one full-vocabulary tile per head: the student's logits
h_s·W_sᵀ + b_s and the teacher's h_t·W_tᵀ + b_t ([rows, V] each, fp32; float64 for float64
inputs). A full-vocabulary tile holds both log-sum-exps, so the divergence, the student's entropy
and the gradient with respect to the student's logits G (alignkit/ops/divergence.py) come from
that one tile, and G goes straight into the two gradient GEMMs:

    single_pass  forward forms G and runs G·W_s and Gᵀ·h_s: 4 GEMMs per token (the floor); the
                 gradients are held from forward to backward (fp32 grad_W_s and grad_h_s), and
                 backward scales them by the upstream scalar (alignkit/ops/pass_autograd.py).
    recompute    forward scores the tiles only (2 GEMMs); backward forms them again with G
                 (4 more): 6 GEMMs, nothing held between the two but the inputs.
The plan: TileOptions.plan where pinned ("single_pass_fast" is the single pass: there is nothing
deferred to keep); else the single pass where its peak fits TileOptions.memory, the recompute
past it (choose_plan); the recompute's forward alone where no gradient is wanted. Not timed:
the single pass does a strict subset of the recompute's work.

Tiles: single_pass_bytes (CPU) or gpu_chunk_bytes (CUDA) for the single pass, tile_bytes for the
recompute, each divided among the tile's two [rows, V] fp32 buffers (and three [rows,
vocab_block] temporaries: alignkit/ops/divergence.py). The GEMMs are
torch's (alignkit/ops/distill_gemms.py); the elementwise divergence is torch's too, in
place on the preallocated buffers: neither the cpp kernels nor the triton ones compute a
divergence (they fold log-probs of a label), so every backend runs this one path.

Shapes: student_hidden [N, H_s], student_weight [V, H_s], teacher_hidden [N, H_t],
teacher_weight [V, H_t], biases [V], labels [N] (only labels != ignore_index is read).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from alignkit.ops import plan as plan_mod
from alignkit.ops.distill_gemms import HeadGemms
from alignkit.ops.divergence import LIVE_TILES, grad_factor, tile_divergence
from alignkit.ops.options import TileOptions, is_real
from alignkit.ops.pass_autograd import needs, scaled_grads, stash
from alignkit.ops.pass_budget import NO_GRAD
from alignkit.ops.validate import check_float, check_labels, check_same_device, compact

# forwards run per plan ("single_pass", "recompute", "forward": no gradient wanted): tests
# and drop-ins prove alignkit's pass ran
CALLS: Counter = Counter()


@dataclass(frozen=True, eq=False)
class DistillSpec:
    """What one distillation pass runs (distill_loss's arguments and its tile sizes), built per
    call; not an options object (the engine's options are TileOptions)."""
    beta: float
    inv_temp: float
    ignore_index: int
    num_items: object        # None (mean over the labelled tokens), a number or a 0-dim tensor
    rows: int                # labelled rows per tile
    vocab_block: int         # vocab columns per logits GEMM and elementwise step


# ---- validation ------------------------------------------------------------------------------

def check_inputs(hs, ws, ht, wt, labels, bs, bt, beta, temperature, ignore_index, num_items,
                 tiles):
    """Every error names the argument, before any work."""
    for name, x in (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht),
                    ("teacher_weight", wt)):
        check_float(name, x)
    for name, w in (("student_weight", ws), ("teacher_weight", wt)):
        if w.dim() != 2 or 0 in w.shape:
            raise ValueError(f"{name} must be 2-D [V, H] with V, H >= 1, got {tuple(w.shape)}")
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"student_weight and teacher_weight must share the vocabulary: "
                         f"student_weight is {tuple(ws.shape)} (V={ws.shape[0]}), teacher_weight "
                         f"{tuple(wt.shape)} (V={wt.shape[0]})")
    for hn, h, wn, w in (("student_hidden", hs, "student_weight", ws),
                         ("teacher_hidden", ht, "teacher_weight", wt)):
        if h.dim() < 1 or h.shape[-1] != w.shape[1]:
            raise ValueError(f"{hn} must be [..., H] with H = {wn}.shape[1] = {w.shape[1]}, "
                             f"got {tuple(h.shape)}")
    if ht.shape[:-1] != hs.shape[:-1]:
        raise ValueError(f"teacher_hidden must have student_hidden's token shape "
                         f"{tuple(hs.shape[:-1])}, got {tuple(ht.shape[:-1])}")
    check_labels(labels, hs.shape[:-1], "student_hidden.shape[:-1]")
    V = ws.shape[0]
    for name, b, like, lname in (("student_bias", bs, ws, "student_weight"),
                                 ("teacher_bias", bt, wt, "teacher_weight")):
        if b is None:
            continue
        check_float(name, b)
        if tuple(b.shape) != (V,):
            raise ValueError(f"{name} must have shape [V] = ({V},), got {tuple(b.shape)}")
        if b.dtype != like.dtype:
            raise TypeError(f"{name} must have {lname}'s dtype {like.dtype}, got {b.dtype}")
    for hn, h, wn, w in (("student_hidden", hs, "student_weight", ws),
                         ("teacher_hidden", ht, "teacher_weight", wt)):
        if h.dtype != w.dtype:
            raise TypeError(f"{hn} and {wn} must share one dtype, got {h.dtype} and {w.dtype}")
    check_same_device(student_hidden=hs, student_weight=ws, teacher_hidden=ht,
                      teacher_weight=wt, labels=labels, student_bias=bs, teacher_bias=bt)
    if not (is_real(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if not (is_real(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a number or a one-element tensor, got shape "
                                 f"{tuple(num_items.shape)}")
        elif not (is_real(num_items) and num_items > 0):
            raise ValueError(f"num_items must be None, a number > 0 or a tensor, got "
                             f"{num_items!r}")
    if tiles is not None and not isinstance(tiles, TileOptions):
        raise TypeError(f"tiles must be an alignkit.TileOptions, got {tiles!r}")


# ---- the tiles -------------------------------------------------------------------------------

def rows_for(V: int, Hs: int, device, tiles, recompute: bool) -> int:
    """Labelled rows per tile: the plan's budget (TileOptions.resolved for the student's head)
    over the tile's fp32 buffers (LIVE_TILES [rows, V] and three [rows, vocab_block])."""
    t = (tiles or TileOptions()).resolved(head=(V, Hs))
    budget = t.tile_bytes if recompute else (
        t.gpu_chunk_bytes if torch.device(device).type == "cuda" else t.single_pass_bytes)
    return max(1, budget // (4 * (LIVE_TILES * V + 3 * vocab_block(V, device, tiles))))


def vocab_block(V: int, device, tiles) -> int:
    """Vocab columns per elementwise step: TileOptions.vocab_block on CPU (a block in cache);
    the whole vocabulary on CUDA, where each step is a kernel launch (63 blocks of 2048 at
    V=128256 would be ~3000 launches a tile) and the card's bandwidth, not a cache, is what
    the steps read."""
    if torch.device(device).type == "cuda":
        return V
    return min((tiles or TileOptions()).resolved().vocab_block, V)


def _sweep(hs, ws, labels, bs, ht, wt, bt, o: DistillSpec, need_h, need_w, need_b,
           upstream=None):
    """(loss, per-token entropy [N], gh, gw, gb): the divergence of every labelled token, and,
    where a gradient is needed, its gradient (times upstream, a 0-dim tensor, where given)."""
    dt = torch.float64 if hs.dtype == torch.float64 else torch.float32
    dev, V = ws.device, ws.shape[0]
    vb = min(o.vocab_block, V)
    x = HeadGemms(hs, ws, bs, ht, wt, bt, dt, vb)
    N = x.s.h.shape[0]
    idx = compact(labels.reshape(-1) != o.ignore_index)
    M = idx.numel()
    f = dict(dtype=dt, device=dev)
    w = (torch.as_tensor(o.num_items, **f).reshape(()).reciprocal() if o.num_items is not None
         else torch.tensor(1.0 / max(M, 1), **f))
    need = need_h or need_w or need_b
    # the constant every G element carries: the loss weight, 1/temperature (∂z/∂logits) and
    # the divergence's own factor; applied on the [rows, H] side of the GEMMs
    c = w * (o.inv_temp * grad_factor(o.beta))
    if upstream is not None:
        c = c * upstream.to(dt)
    gh = torch.zeros(N, hs.shape[-1], **f) if need_h else None
    gw = torch.zeros(V, ws.shape[1], **f) if need_w and M == 0 else (
        torch.empty(V, ws.shape[1], **f) if need_w else None)
    gb = torch.zeros(V, **f) if need_b else None
    div = torch.empty(M, **f)
    ent = torch.zeros(N, **f)
    n_rows = min(o.rows, max(M, 1))
    zs_buf, zt_buf = (torch.empty(n_rows, V, **f) for _ in range(LIVE_TILES))
    tmps = [torch.empty(n_rows, vb, **f) for _ in range(3)]
    for i0 in range(0, M, o.rows):
        ic = idx[i0:i0 + o.rows]
        n = ic.numel()
        zs, zt, tm = zs_buf[:n], zt_buf[:n], [b[:n] for b in tmps]
        hc = x.s.rows(ic)
        lse_s = x.logits(zs, hc, x.s, o.inv_temp, tm[0])
        lse_t = x.logits(zt, x.t.rows(ic), x.t, o.inv_temp, tm[0])
        d, e, G = tile_divergence(zs, zt, lse_s, lse_t, o.beta, need, vb, tm)
        div[i0:i0 + n] = d
        ent.index_copy_(0, ic, e)
        if need:
            x.grads(G, hc, ic, c, gh, gw, gb, first=i0 == 0)
    loss = div.sum() * w
    return loss, ent, gh, gw, gb


# ---- autograd --------------------------------------------------------------------------------

class _SinglePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, labels, bs, ht, wt, bt, o: DistillSpec):
        need = needs(ctx, bs)
        CALLS["single_pass"] += 1
        loss, ent, gh, gw, gb = _sweep(hs, ws, labels, bs, ht, wt, bt, o, *need)
        stash(ctx, (gh, gw, gb), _form, o, need, hs, ws, labels, bs, ht, wt, bt)
        ctx.mark_non_differentiable(ent)
        return loss.detach(), ent

    @staticmethod
    def backward(ctx, grad_loss, _gent):
        return scaled_grads(ctx, grad_loss)


def _form(hs, ws, labels, bs, ht, wt, bt, o, need_h, need_w, need_b):
    """pass_autograd.stash's form: the gradients again, for a second backward."""
    return _sweep(hs, ws, labels, bs, ht, wt, bt, o, need_h, need_w, need_b)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, labels, bs, ht, wt, bt, o: DistillSpec):
        CALLS["recompute"] += 1
        loss, ent, *_ = _sweep(hs, ws, labels, bs, ht, wt, bt, o, False, False, False)
        ctx.o, ctx.need = o, needs(ctx, bs)
        ctx.save_for_backward(hs, ws, labels, bs, ht, wt, bt)
        ctx.mark_non_differentiable(ent)
        return loss, ent

    @staticmethod
    def backward(ctx, grad_loss, _gent):
        hs, ws, labels, bs, ht, wt, bt = ctx.saved_tensors
        _, _, gh, gw, gb = _sweep(hs.detach(), ws.detach(), labels,
                                  None if bs is None else bs.detach(), ht.detach(), wt.detach(),
                                  None if bt is None else bt.detach(), ctx.o, *ctx.need,
                                  upstream=grad_loss)
        return (gh.view(hs.shape).to(hs.dtype) if gh is not None else None,
                gw.to(ws.dtype) if gw is not None else None, None,
                gb.to(bs.dtype) if gb is not None else None, None, None, None, None)


# ---- the plan --------------------------------------------------------------------------------

def choose_plan(hs, ws, bs, n_rows: int, tiles) -> str:
    """"single_pass", "recompute" or "forward" (no gradient wanted: the recompute's forward).

    Both plans peak with the same accumulators (grad_W_s and grad_h_s in fp32, and grad_W_s
    handed back in the weight's dtype): the single pass from its forward on, the recompute in
    its backward, and in a step nothing is allocated between the loss's forward and its
    backward. They differ in the tile: single_pass_bytes (gpu_chunk_bytes on CUDA) against
    tile_bytes. So memory="min" (the recompute's footprint) takes the recompute, a byte cap the
    single pass where its peak fits and else the recompute, "bound" and "fast" the single pass."""
    if not (torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (hs, ws, bs))):
        plan_mod.note("recompute", NO_GRAD)
        return "forward"
    t = (tiles or TileOptions()).resolved(head=tuple(ws.shape))
    V, H = ws.shape
    dev = ws.device
    per_row = 4 * (LIVE_TILES * V + 3 * vocab_block(V, dev, tiles))
    acc = V * H * 4 + n_rows * H * 4 + (
        V * H * ws.dtype.itemsize if ws.dtype not in (torch.float32, torch.float64) else 0)
    peaks = {"single_pass": acc + min(rows_for(V, H, dev, tiles, False), n_rows) * per_row,
             "recompute": acc + min(rows_for(V, H, dev, tiles, True), n_rows) * per_row}
    cap = t.memory if isinstance(t.memory, int) else None
    pinned = {"single_pass_fast": "single_pass"}.get(t.plan, t.plan)
    if pinned is not None:
        if cap is not None and peaks[pinned] > cap:
            raise ValueError(f"plan {t.plan!r} needs {peaks[pinned] / 2**20:.1f} MiB, over "
                             f"memory={cap} ({cap / 2**20:.1f} MiB): raise memory, or leave "
                             "plan unset")
        plan_mod.note(pinned, "pinned")
        return pinned
    if t.memory == "min" or (cap is not None and peaks["single_pass"] > cap):
        if cap is not None and peaks["recompute"] > cap:
            raise ValueError(f"memory={cap} ({cap / 2**20:.1f} MiB) is below the recompute's "
                             f"{peaks['recompute'] / 2**20:.1f} MiB")
        plan_mod.note("recompute", "memory")
        return "recompute"
    plan_mod.note("single_pass", "memory")
    return "single_pass"


def distill(hs, ws, ht, wt, labels, *, beta=1.0, temperature=1.0, student_bias=None,
            teacher_bias=None, ignore_index=-100, num_items=None, tiles=None):
    """(loss 0-dim, per-token student entropy [labels' shape], detached; 0 at ignored tokens,
    labelled-token count). Validates, chooses the plan, runs it. No gradient reaches the
    teacher's tensors, even where they require one: the teacher is a constant."""
    dev = hs.device.type if isinstance(hs, torch.Tensor) else None
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        # as torch.autocast runs a matmul (and alignkit.ops.backends.autocast_head the other
        # heads): both heads' fp32/bf16/fp16 tensors in the autocast dtype (differentiable
        # casts: an fp32 master weight gets an fp32 gradient), the pass with autocast off
        dt = torch.get_autocast_dtype(dev)

        def cast(t):
            ok = isinstance(t, torch.Tensor) and t.dtype in (
                torch.float32, torch.bfloat16, torch.float16)
            return t.to(dt) if ok and t.dtype != dt else t
        with torch.autocast(dev, enabled=False):
            return distill(cast(hs), cast(ws), cast(ht), cast(wt), labels, beta=beta,
                           temperature=temperature, student_bias=cast(student_bias),
                           teacher_bias=cast(teacher_bias), ignore_index=ignore_index,
                           num_items=num_items, tiles=tiles)
    check_inputs(hs, ws, ht, wt, labels, student_bias, teacher_bias, beta, temperature,
                 ignore_index, num_items, tiles)
    beta = float(beta)
    n_rows = labels.numel()
    plan = choose_plan(hs, ws, student_bias, max(n_rows, 1), tiles)
    V, H = ws.shape
    o = DistillSpec(beta=beta, inv_temp=1.0 / float(temperature), ignore_index=ignore_index,
                       num_items=num_items,
                       rows=rows_for(V, H, ws.device, tiles, plan != "single_pass"),
                       vocab_block=vocab_block(V, ws.device, tiles))
    detach = (lambda x: None if x is None else x.detach())
    ht, wt, bt = detach(ht), detach(wt), detach(teacher_bias)
    if plan == "forward":
        CALLS["forward"] += 1
        with torch.no_grad():
            loss, ent, *_ = _sweep(hs, ws, labels, student_bias, ht, wt, bt, o,
                                   False, False, False)
    else:
        fn = _SinglePass if plan == "single_pass" else _Recompute
        loss, ent = fn.apply(hs, ws, labels, student_bias, ht, wt, bt, o)
    return loss, ent.view(labels.shape)
