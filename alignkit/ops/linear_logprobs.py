"""Fused linear log-probs: log p(label | hidden) through the LM head without [N, V] logits.

    x = h·Wᵀ + b                      raw logits of one tile, [rows, vocab_block] fp32
    z = softcap·tanh(x/softcap) / T   (softcap optional)
    logp_i = z_{i,y_i} − logsumexp_v z_{i,v},   entropy_i = lse_i − Σ_v p_{i,v} z_{i,v}

Forward: only labelled tokens are gathered, a chunk at a time; each chunk walks the vocab in blocks,
one GEMM per tile, and the tile is folded into per-token online-LSE statistics (tile_kernels).
Nothing of size N·V is kept: backward recomputes each tile (one more GEMM), turns it into
dL/dx in place, and feeds it to the two gradient GEMMs. That is 4 GEMMs against the 3-GEMM floor;
a generic op cannot do better, since it learns its upstream gradient only in backward (the fused
losses in alignkit.losses know it in forward and skip the recompute).

A no-grad call runs 1 GEMM per tile plus the fold and saves nothing.

Registered as custom ops (alignkit::linear_logprobs_fwd / _bwd) with a fake implementation and
autograd, so torch.compile traces around it without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.ops import tiling, triton_path
from alignkit.ops.backends import autocast_head, gemm_dtype, resolve
from alignkit.ops.gemm32 import addmm32
from alignkit.ops.options import LogprobArgs, TileOptions, materialize_grads
from alignkit.ops.tile_kernels import KERNELS, LIVE_TILES, RowStats
from alignkit.ops.validate import check_linear_inputs, compact, labelled_rows
from alignkit.ops.vocab_shard import is_dtensor, is_vocab_parallel

_EMPTY = (0,)


def _chunks(h2: Tensor, y: Tensor, idx: Tensor, p: tiling.TilePlan, dt: torch.dtype):
    """Yields (ic, hc, yc, buf) per token chunk of the labelled tokens idx (p: _plan's): their
    indices, hidden rows (in the GEMM dtype dt, backends.gemm_dtype: bf16 on CPUs with bf16
    units, where a bf16 GEMM ran 3.5x an fp32 one, fp32 elsewhere) and labels, and the one tile
    buffer every chunk reuses (in dt: torch's CPU GEMM writes its own dtype)."""
    M = idx.numel()
    buf = torch.empty(min(p.rows, M) * p.vocab_block, dtype=dt,
                      device=h2.device) if M else None
    for c0 in range(0, M, p.rows):
        ic = idx[c0:c0 + p.rows]
        yield ic, h2.index_select(0, ic).to(dt), y.index_select(0, ic), buf


def _plan(M: int, H: int, V: int, backend: str, dt: torch.dtype, tiles: TileOptions,
          backward: bool = False):
    # a bf16 tile plus the fp32 G of backward: 1.5 fp32 tiles
    live = LIVE_TILES.get(backend, 1) * (1.5 if dt != torch.float32 else 1)
    p = tiling.plan(M, H, V, tiles.tile_bytes, tiles.vocab_block, live_tiles=live)
    if backward and dt != torch.float32 and p.rows < M:
        # several chunks: the low-precision backward's fp32 [vocab_block, H] block of grad_W
        # (_backward_low_precision) comes out of the same budget, up to half of it (2 MiB of
        # 16 at H=256: without it the long pair's bf16 peak was 0.8 MiB over its bound)
        acc = p.vocab_block * H * 4
        p = tiling.plan(M, H, V, max(tiles.tile_bytes - acc, tiles.tile_bytes // 2),
                        tiles.vocab_block, live_tiles=live)
    return p


def _logits_tile(buf: Tensor, hc: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int):
    r = hc.shape[0]
    tile = buf[: r * (v1 - v0)].view(r, v1 - v0)
    wb = weight[v0:v1].to(hc.dtype)
    if bias is None:
        torch.mm(hc, wb.t(), out=tile)
    else:
        torch.addmm(bias[v0:v1].to(hc.dtype), hc, wb.t(), out=tile)
    return tile, wb


def _opts(ignore_index, temperature, softcap, return_entropy, backend, tile_bytes, vocab_block,
          gpu_chunk_bytes=None, triton_bwd=None) -> LogprobArgs:
    return LogprobArgs(ignore_index=ignore_index, temperature=temperature,
                          softcap=softcap if softcap > 0 else None,
                          return_entropy=return_entropy, backend=backend,
                          tiles=TileOptions(tile_bytes=tile_bytes, vocab_block=vocab_block,
                                            gpu_chunk_bytes=gpu_chunk_bytes,
                                            triton_bwd=triton_bwd))


def forward_impl(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
                 opts: LogprobArgs, backend: str):
    """Returns (logprobs[N], entropy[N] or [0], lse2[N, 2], M) for flattened inputs.

    lse2 holds (running max m, log Σexp(z − m)) per token: lse = m + log s, kept in two parts
    for an exact backward at large logits (tile_kernels). M: the labelled-token count (a host
    int, from the forward's one host read), which the backward reuses.
    """
    V, H = weight.shape
    h2 = hidden.reshape(-1, H)
    y = labels.reshape(-1).long()
    N = y.numel()
    idx = labelled_rows(y, V, opts.ignore_index)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lp = torch.zeros(N, **f32)
    lse_out = torch.zeros(N, 2, **f32)
    ent_out = torch.zeros(N if opts.return_entropy else 0, **f32)
    M = idx.numel()
    if M == 0:
        return lp, ent_out, lse_out, M
    if backend == "triton":
        lp_s, m_s, logs_s, ent_s = triton_path.linear_forward(
            h2.index_select(0, idx), weight, y.index_select(0, idx), bias, opts.inv_temp, opts.cap)
        lp.index_copy_(0, idx, lp_s)
        lse_out.index_copy_(0, idx, torch.stack([m_s, logs_s], 1))
        if opts.return_entropy:
            ent_out.index_copy_(0, idx, ent_s)
        return lp, ent_out, lse_out, M
    fold, _ = KERNELS[backend]
    dt = gemm_dtype(weight.dtype, weight.device)
    p = _plan(M, H, V, backend, dt, opts.tiles)
    for ic, hc, yc, buf in _chunks(h2, y, idx, p, dt):
        st = RowStats.new(ic.numel(), opts.return_entropy, hidden.device)
        for v0 in range(0, V, p.vocab_block):
            v1 = min(V, v0 + p.vocab_block)
            tile, _ = _logits_tile(buf, hc, weight, bias, v0, v1)
            fold(tile, yc, v0, st, opts)
        lp.index_copy_(0, ic, st.logprob())
        lse_out.index_copy_(0, ic, st.lse2())
        if opts.return_entropy:
            ent_out.index_copy_(0, ic, st.entropy())
    return lp, ent_out, lse_out, M


def backward_impl(grad_lp: Tensor, grad_ent: Optional[Tensor], hidden: Tensor, weight: Tensor,
                  labels: Tensor, bias: Optional[Tensor], lse: Tensor, entropy: Optional[Tensor],
                  opts: LogprobArgs, backend: str, need_h: bool, need_w: bool, need_b: bool,
                  M: int):
    V, H = weight.shape
    h2 = hidden.reshape(-1, H)
    y = labels.reshape(-1).long()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # the forward's count M sizes the compaction on a card: no host read in backward
    idx = compact(y != opts.ignore_index, M)
    g_lp_all = grad_lp.reshape(-1).float()
    g_ent_all = grad_ent.reshape(-1).float() if grad_ent is not None else None
    dt = gemm_dtype(weight.dtype, weight.device)
    if dt != torch.float32 and backend != "triton":
        _, grad = KERNELS[backend]
        p = _plan(idx.numel(), H, V, backend, dt, opts.tiles, backward=True)
        gh_lab, gw, gb = _backward_low_precision(
            h2, weight, bias, (idx, y, lse, g_lp_all, g_ent_all, entropy), opts, grad, p, dt,
            need_h, need_w, need_b)
        gh = None
        if need_h:         # the labelled rows' fp32 sums -> a gradient in hidden's dtype, a
            gh = torch.zeros(h2.shape, dtype=hidden.dtype, device=hidden.device)   # chunk at a
            for c0 in range(0, idx.numel(), p.rows):                                # time
                gh.index_copy_(0, idx[c0:c0 + p.rows], gh_lab[c0:c0 + p.rows].to(hidden.dtype))
        return _cast_grads(gh, gw, gb, hidden, weight, bias)
    gh = torch.zeros(h2.shape, **f32) if need_h else None
    if backend == "triton" and idx.numel():
        lse_s = lse.index_select(0, idx)
        dh, gw, gb = triton_path.linear_backward(
            h2.index_select(0, idx), weight, y.index_select(0, idx), bias,
            lse_s[:, 0].contiguous(), lse_s[:, 1].contiguous(), g_lp_all.index_select(0, idx),
            entropy.reshape(-1).index_select(0, idx) if g_ent_all is not None else None,
            g_ent_all.index_select(0, idx) if g_ent_all is not None else None,
            opts.inv_temp, opts.cap, need_h, need_w, need_b, opts.tiles)
        if need_h:
            gh.index_copy_(0, idx, dh)
        return _cast_grads(gh, gw, gb, hidden, weight, bias)
    _, grad = KERNELS.get(backend, (None, None))
    p = _plan(idx.numel(), H, V, backend, dt, opts.tiles)
    # grad_W is written by the first chunk's GEMMs and added to by the others: no [V, H] zero
    # fill up front (a pass over the largest gradient, for nothing), only where no row is labelled
    gw = torch.empty(V, H, **f32) if need_w else None
    gb = torch.zeros(V, **f32) if need_b else None
    first = True
    for ic, hc, yc, buf in _chunks(h2, y, idx, p, dt):
        lse_c, g_c, ent_c, ge_c = _row_values(ic, lse, g_lp_all, g_ent_all, entropy)
        ghc = torch.zeros(ic.numel(), H, **f32) if need_h else None
        for v0 in range(0, V, p.vocab_block):
            v1 = min(V, v0 + p.vocab_block)
            tile, wb = _logits_tile(buf, hc, weight, bias, v0, v1)
            grad(tile, tile, yc, v0, lse_c, g_c, ent_c, ge_c, opts)
            if need_h:
                ghc.addmm_(tile, wb)
            if need_w:
                addmm32(gw[v0:v1], tile.t(), hc, first=first)
            if need_b:
                gb[v0:v1] += tile.sum(0)
        first = False
        if need_h:
            gh.index_copy_(0, ic, ghc)
    if need_w and first:
        gw.zero_()
    return _cast_grads(gh, gw, gb, hidden, weight, bias)


def _row_values(ic, lse, g_lp_all, g_ent_all, entropy):
    """The backward's per-row inputs of the labelled rows ic: (lse2, dL/dlogp, entropy,
    dL/dentropy; the last two None without an entropy gradient)."""
    ge_c = g_ent_all.index_select(0, ic) if g_ent_all is not None else None
    ent_c = entropy.reshape(-1).index_select(0, ic) if ge_c is not None else None
    return lse.index_select(0, ic), g_lp_all.index_select(0, ic), ent_c, ge_c


def _backward_low_precision(h2, weight, bias, rows, opts, grad, p, dt, need_h, need_w, need_b):
    """The recompute's backward with bf16/fp16 GEMMs (fp32 accumulation inside each GEMM; G
    formed in fp32 from the low-precision logits, then rounded to dt for its two GEMMs).

    The vocabulary is the outer loop, so each [vocab_block, H] block of grad_W is finished
    before the next begins: one chunk of rows writes it straight from its GEMM in dt (with the
    one rounding an fp32 accumulator would get at the end); several chunks sum into one fp32
    block, which is then rounded into grad_W. So grad_W is never held in fp32: that [V, H]
    accumulator is twice the bf16 gradient itself, and with its final cast the peak was 1.59x
    (grad_W + grad_h) at B1 (4 x 1024 tokens, H=1024, 3 chunks) against 1.3x in fp32. Every
    tile is still formed once: the same GEMMs in another order; a chunk's hidden rows are
    gathered once per vocab block (a [rows, H] copy beside a [rows, vocab_block, H] GEMM).
    grad_h is summed in fp32 over the labelled rows only ([M, H], in idx's order: the prompt's
    rows get no fp32 copy), and the tile buffers are freed on return, before the caller rounds
    it into hidden's dtype. Returns (grad_h of the labelled rows, grad_W in dt, fp32 grad_b)."""
    idx, y, lse, g_lp_all, g_ent_all, entropy = rows
    V, H = weight.shape
    dev = h2.device
    per_row = []                      # each chunk's start, rows, labels and row values
    for c0 in range(0, idx.numel(), p.rows):
        ic = idx[c0:c0 + p.rows]
        per_row.append((c0, ic, y.index_select(0, ic),
                        *_row_values(ic, lse, g_lp_all, g_ent_all, entropy)))
    gh = torch.zeros(idx.numel(), H, dtype=torch.float32, device=dev) if need_h else None
    gw = torch.empty(V, H, dtype=dt, device=dev) if need_w else None
    gb = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    if not per_row:
        return gh, (gw.zero_() if need_w else None), gb
    buf = torch.empty(min(p.rows, idx.numel()) * p.vocab_block, dtype=dt, device=dev)
    gbuf = torch.empty(buf.numel(), dtype=torch.float32, device=dev)
    acc = torch.empty(min(p.vocab_block, V), H, dtype=torch.float32, device=dev) \
        if need_w and len(per_row) > 1 else None
    for v0 in range(0, V, p.vocab_block):
        v1 = min(V, v0 + p.vocab_block)
        if acc is not None:
            acc[: v1 - v0].zero_()
        for c0, ic, yc, lse_c, g_c, ent_c, ge_c in per_row:
            hc = h2.index_select(0, ic).to(dt)
            tile, wb = _logits_tile(buf, hc, weight, bias, v0, v1)
            g = gbuf[: tile.numel()].view(tile.shape)
            grad(tile, g, yc, v0, lse_c, g_c, ent_c, ge_c, opts)
            if need_b:
                gb[v0:v1] += g.sum(0)
            tile.copy_(g)                     # G in the GEMM dtype, over the spent logits
            if gh is not None:
                gh[c0:c0 + ic.numel()].add_(tile @ wb)
            if acc is not None:
                acc[: v1 - v0].add_(tile.t() @ hc)
            elif need_w:
                torch.mm(tile.t(), hc, out=gw[v0:v1])
        if acc is not None:
            gw[v0:v1].copy_(acc[: v1 - v0])
    return gh, gw, gb


def _cast_grads(gh, gw, gb, hidden, weight, bias):
    """fp32 accumulators -> the inputs' dtypes and shapes (no copy for fp32 inputs)."""
    return (gh.to(hidden.dtype).reshape(hidden.shape) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None)


# ------------------------------------------------------------------------------ custom op layer
@torch.library.custom_op("alignkit::linear_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
            ignore_index: int, temperature: float, softcap: float, return_entropy: bool,
            backend: str, tile_bytes: int, vocab_block: int, gpu_chunk_bytes: int,
            triton_bwd: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = _opts(ignore_index, temperature, softcap, return_entropy, backend, tile_bytes,
                 vocab_block, gpu_chunk_bytes, triton_bwd)
    lp, ent, lse, M = forward_impl(hidden, weight, labels, bias, opts, backend)
    shape = labels.shape
    # M as a CPU scalar: the backward reads it without a device sync
    return (lp.view(shape), (ent.view(shape) if return_entropy else ent),
            lse.view(*shape, 2), torch.tensor(M, dtype=torch.int64))


@_fwd_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, temperature, softcap, return_entropy, backend,
      tile_bytes, vocab_block, gpu_chunk_bytes, triton_bwd):
    out = labels.new_empty(labels.shape, dtype=torch.float32)
    ent = labels.new_empty(labels.shape if return_entropy else _EMPTY, dtype=torch.float32)
    return (out, ent, labels.new_empty((*labels.shape, 2), dtype=torch.float32),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("alignkit::linear_logprobs_bwd", mutates_args=())
def _bwd_op(grad_lp: Tensor, grad_ent: Optional[Tensor], hidden: Tensor, weight: Tensor,
            labels: Tensor, bias: Optional[Tensor], lse: Tensor, entropy: Optional[Tensor],
            ignore_index: int, temperature: float, softcap: float, backend: str,
            need_h: bool, need_w: bool, need_b: bool, tile_bytes: int, vocab_block: int,
            gpu_chunk_bytes: int, triton_bwd: str, n_labelled: Tensor) -> tuple[Tensor, Tensor,
                                                                                Tensor]:
    opts = _opts(ignore_index, temperature, softcap, entropy is not None, backend, tile_bytes,
                 vocab_block, gpu_chunk_bytes, triton_bwd)
    gh, gw, gb = backward_impl(grad_lp, grad_ent, hidden, weight, labels, bias, lse.reshape(-1, 2),
                               entropy, opts, backend, need_h, need_w, need_b, int(n_labelled))
    # outputs may not alias each other: a fresh empty tensor for each gradient not asked for
    return tuple(g if g is not None else hidden.new_empty(_EMPTY) for g in (gh, gw, gb))


@_bwd_op.register_fake
def _(grad_lp, grad_ent, hidden, weight, labels, bias, lse, entropy, ignore_index, temperature,
      softcap, backend, need_h, need_w, need_b, tile_bytes, vocab_block, gpu_chunk_bytes,
      triton_bwd, n_labelled):
    gh = hidden.new_empty(hidden.shape if need_h else _EMPTY)
    gw = weight.new_empty(weight.shape if need_w else _EMPTY)
    gb = (bias if bias is not None else weight).new_empty(bias.shape if need_b else _EMPTY)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, temperature, softcap, return_entropy, backend = \
        inputs[:9]
    _, ent, lse, n_labelled = output
    ctx.save_for_backward(hidden, weight, labels, bias, lse, ent if return_entropy else None)
    ctx.n_labelled = n_labelled
    ctx.args = (ignore_index, temperature, softcap, backend)
    ctx.tiles = inputs[9:]                # tile_bytes, vocab_block, gpu_chunk_bytes, triton_bwd


def _backward(ctx, grad_lp, grad_ent, _grad_lse, _grad_n):
    hidden, weight, labels, bias, lse, ent = ctx.saved_tensors
    ignore_index, temperature, softcap, backend = ctx.args
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[3]
    grad_lp, grad_ent = materialize_grads(grad_lp, grad_ent, lse, ent)
    gh, gw, gb = _bwd_op(grad_lp, grad_ent, hidden, weight, labels, bias, lse, ent, ignore_index,
                         temperature, softcap, backend, need_h, need_w, need_b, *ctx.tiles,
                         ctx.n_labelled)
    return (gh if need_h else None, gw if need_w else None, None, gb if need_b else None,
            *([None] * 9))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor],
                    opts: LogprobArgs):
    """Launcher: validates, resolves the backend, calls the op. Returns (logprobs, entropy|None)."""
    lp, ent, _ = linear_logprobs_stats(hidden, weight, labels, bias=bias, opts=opts)
    return lp, ent


@autocast_head
def linear_logprobs_stats(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor], opts: LogprobArgs):
    """As linear_logprobs, plus the per-token row statistics [..., 2] = (max logit m,
    log Σ exp(z − m)) of the transformed logits z, without gradient: the drop-ins derive TRL's
    is_top1 from them (the label is the argmax iff z_label = m, i.e. logp = −log Σ exp(z − m)).

    A head split over the vocabulary across ranks (a DTensor weight, or a local shard with
    opts.tiles.vocab_group) takes alignkit/ops/vocab_parallel.py: the same outputs, merged over
    the ranks with O(tokens) communication."""
    if is_vocab_parallel(weight, opts.tiles) or is_dtensor(bias):
        # imported here: vocab_parallel builds on this module's tile loop and backward
        from alignkit.ops.vocab_parallel import vocab_parallel_stats
        return vocab_parallel_stats(hidden, weight, labels, bias=bias, opts=opts)
    check_linear_inputs(hidden, weight, labels, bias)
    backend = resolve(opts.backend, hidden.device)
    t = opts.tiles.resolved(head=tuple(weight.shape))
    lp, ent, lse, _ = _fwd_op(hidden, weight, labels, bias, opts.ignore_index,
                           float(opts.temperature), opts.cap, opts.return_entropy, backend,
                           t.tile_bytes, t.vocab_block, t.gpu_chunk_bytes, t.triton_bwd)
    return lp, (ent if opts.return_entropy else None), lse.detach()
