"""Single-pass gradients for B preference pairs: the gradient is formed in the forward pass.

For a pair whose loss depends on the two sequence log-probs only through u = a_c·c − a_r·r
(c, r the loss's log-probs of chosen and rejected; a = 1, or 1/|tokens| for IPO-style
normalisation), the gradient w.r.t. the logits z_t of a token t of sequence s is
    dL/dz_t = f'(u) · (±a_s·w_s) · (onehot(y_t) − p_t)          (+ for chosen, − for rejected)
with w_s = 1 for sums and 1/|s| for averages. Everything but the scalar k = f'(u) is known per
token once its row's log-sum-exp is, so a tile spanning the whole vocabulary [rows, V] gives, in
the forward pass:
    lp_t                      (the log-prob, for the loss),
    G_t = ±a_s·w_s·(onehot − p_t)   in place of the tile (the C++ / torch grad kernel),
    grad_h_t = G_t · W        (unscaled; written straight into the [N, H] gradient buffer),
    A += G_tᵀ · h_t           (one [V, H] accumulator, which becomes grad_W).
After the pair's last tile the loss and k are known, and A, grad_h and grad_b are scaled by k in
place. Three GEMMs per tile instead of the recompute path's four: no tile is computed twice.

Several pairs. Each pair has its own k, and a second [V, H] accumulator per pair in flight would
break the memory budget (fused.py has the arithmetic). So one group goes unscaled into the empty
accumulators: the longest pair (the most labelled tokens). Every other sequence is first scored
forward only; once all log-probs are known, the loss gives every sequence's scalar, the group is
scaled, and the other sequences' tiles are formed again with their scalars known. GEMMs: 3 per
token of the group, 4 per other token (its logits twice), e.g. 7/6 of the floor for two equal
pairs, against the recompute's 4/3 for any batch.

Tied (the group is the whole pair): SimPO; DPO types that are a function of the log-ratio
difference (sigmoid incl. cDPO, hinge, robust, exo_pair, discopop, aot, aot_unpaired; ipo and
sigmoid_norm with the count normalisation), alone or combined. The tie is checked on the loss's
own gradients, and a loss that breaks it raises.

Untied (any other loss of the pair: DPO with sft, nca_pair, bco_pair, sppo_hard, apo_*, CPO and
ORPO with their NLL term): dL/dc and dL/dr are two unrelated scalars, so the group is the
longest pair's chosen sequence alone, and its rejected one joins the others: (3C + 4R) / 3(C + R),
about 1.17x the three-GEMM floor for one pair of equal lengths.

Memory: A ([V, H] fp32, returned as grad_W), the [N, H] hidden-gradient buffer (returned as
grad_h) and one [rows, V] fp32 tile: rows = tile budget / (4V), whatever T and B are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.ops import triton_path
from alignkit.ops.backends import gemm_dtype, resolve
from alignkit.ops.options import LogprobOptions, TileOptions
from alignkit.ops.tile_kernels import KERNELS, RowStats
from alignkit.ops.validate import check_label_range



def tile_rows(V: int, device=None, dtype: torch.dtype = torch.float32, tiles=None) -> int:
    """Token rows per [rows, V] tile, from the bytes an element costs: CUDA, the fp32 tile plus
    G's copy in the inputs' dtype for the two GEMMs (4 + itemsize for bf16/fp16); CPU, the fp32
    tile (4), or the bf16 logits where the GEMMs run in bf16 (2: G is formed a vocab block at a
    time beside it). The budget: TileOptions.single_pass_bytes on CPU (64 MiB), .gpu_chunk_bytes
    on CUDA (1 GiB: 1395 rows at V=128256 in bf16, 6 bytes an element), where the GEMMs that
    read the tile want thousands of rows (each tile's Gᵀ·h reads and writes all of grad_W)."""
    t = (tiles or TileOptions()).resolved()
    device = torch.device(device) if device is not None else torch.device("cpu")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        budget, per = t.gpu_chunk_bytes, 4 + (itemsize if itemsize < 4 else 0)
    else:
        budget = t.single_pass_bytes
        per = 2 if gemm_dtype(dtype, device) != torch.float32 else 4
    return max(1, budget // (per * V))


def _mm32(a, b):
    """a·b as fp32. For bf16/fp16 (the triton backend): fp32 accumulation and output on CUDA; on
    CPU tensors (the interpreter's tests) torch has no fp32-output low-precision mm, so the
    inputs are upcast (the same fp32 accumulation)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm32(acc, a, b):
    """acc (fp32) += a·b, as _mm32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


@dataclass(frozen=True)
class SinglePassOptions:
    loss_fn: object                  # (logps [2B], counts [2B]) -> (loss, metrics)
    num_sequences: int               # 2B
    average: bool
    norm: str                        # 'unit' | 'count' | 'untied'
    logprob: LogprobOptions
    rows: int                        # token rows per [rows, V] tile (tile_rows)
    vocab_block: int = 2048          # columns per logits GEMM inside a tile (TileOptions)


def _mm_tile(t, hc, weight):
    """t (fp32 [rows, V]) = hc·Wᵀ with fp32 accumulation and output, whatever the inputs' dtype:
    the log-softmax then runs on fp32 logits (a bf16 tile rounds them before it, ~5e-3 off)."""
    if hc.dtype == torch.float32:
        torch.mm(hc, weight.t(), out=t)
    elif hc.is_cuda:
        torch.mm(hc, weight.t(), out_dtype=torch.float32, out=t)
    else:                                 # the interpreter's CPU tensors: no fp32-output bf16 mm
        torch.mm(hc.float(), weight.t().float(), out=t)


def _grads(hidden, weight, labels, bias, seg, o: SinglePassOptions, need_h, need_w, need_b):
    """The single pass itself: (loss, sums, counts, gh, gw, gb), gradients of the loss formed
    here (None where not needed)."""
    H = weight.shape[1]
    V = weight.shape[0]
    S = o.num_sequences
    B = S // 2
    dev = hidden.device
    h2 = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    s = seg.reshape(-1)
    keep = y != o.logprob.ignore_index
    idx = keep.nonzero().squeeze(1)
    sid = s.index_select(0, idx)                       # sequence of each labelled token
    counts = torch.bincount(sid, minlength=S)
    counts_f = counts.to(torch.float32)
    per = counts_f.clamp(min=1).reciprocal()
    # dlogp/dlp_t: 1 for sums, 1/|s| for averages (the loss's log-prob units)
    w = per if o.average else torch.ones(S, device=dev)
    backend = resolve(o.logprob.backend, dev)
    fold, grad = KERNELS.get(backend, (None, None))
    # The GEMMs run in the inputs' dtype where that is fast (gemm_dtype: CUDA, CPUs with bf16
    # units), with fp32 accumulation; the statistics, log-probs and accumulators are fp32.
    # triton: an fp32 tile (fp32-output GEMM), G cast for the two gradient GEMMs. CPU bf16: the
    # tile keeps the bf16 logits (torch's CPU GEMM has no fp32 output: they are rounded to bf16,
    # as under autocast), the fold reads them in fp32, and G is formed a vocab block at a time
    # (fp32, then cast) for the two GEMMs of that block: the logits are still formed once.
    tdt = weight.dtype if backend == "triton" else gemm_dtype(weight.dtype, dev)
    cpu_lowp = backend != "triton" and tdt != torch.float32
    gh = torch.zeros(h2.shape[0], H, dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_w else None
    gb = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    n_rows = min(o.rows, max(idx.numel(), 1))
    tile = torch.empty(n_rows, V, dtype=tdt if cpu_lowp else torch.float32, device=dev)
    vb = min(o.vocab_block, V)
    gblk = torch.empty(n_rows, vb, dtype=torch.float32, device=dev) if cpu_lowp else None
    gblk_lp = torch.empty(n_rows, vb, dtype=tdt, device=dev) if cpu_lowp else None
    wt = weight if weight.dtype == tdt else None       # fp32 GEMMs: W converted per block
    bt = bias if bias is None or bias.dtype == tile.dtype else bias.to(tile.dtype)

    def lowp_grads(t, hc, yc, ic, lse2, tw):
        """CPU bf16: per vocab block, G = tw·(onehot − p) from the kept bf16 logits (fp32), cast,
        then gh[ic] += G·W_blk and gw_blk += Gᵀ·h as bf16 GEMMs (fp32 accumulation inside, bf16
        out, added into the fp32 accumulators a block at a time: no second [V, H] buffer)."""
        n = t.shape[0]
        ghc = torch.zeros(n, H, dtype=torch.float32, device=dev) if gh is not None else None
        for v0 in range(0, V, vb):
            v1 = min(V, v0 + vb)
            g, gl = gblk[:n, :v1 - v0], gblk_lp[:n, :v1 - v0]
            grad(t[:, v0:v1], g, yc, v0, lse2, tw, None, None, o.logprob)
            if gb is not None:
                gb[v0:v1] += g.sum(0)
            gl.copy_(g)
            if ghc is not None:
                ghc.add_(gl @ weight[v0:v1])
            if gw is not None:
                gw[v0:v1].add_(gl.t() @ hc)
        if ghc is not None:
            gh.index_copy_(0, ic, ghc)

    def score_tile(t, hc, yc, tw, ic):
        """Log-probs of the tile's rows; with tw, t becomes their G = tw·(onehot − p) (CPU bf16:
        their gradients are accumulated here, lowp_grads)."""
        if backend == "triton":
            # one vendor GEMM for the fp32 tile, then the logits kernels: log-prob, G in place
            _mm_tile(t, hc, weight)
            if bias is not None:
                t.add_(bias)
            return triton_path.tile_logprob_grad(t, yc, tw, o.logprob.inv_temp,
                                                 o.logprob.cap, o.logprob.ignore_index)
        st = RowStats.new(t.shape[0], False, dev)
        # the tile's logits a vocab block at a time, each folded while it is in cache:
        # [rows, 2048] GEMMs ran 1.2-1.3x faster here than one [rows, V] GEMM (bench/
        # RESULTS.md, single pass), and the fold then reads L2, not memory
        for v0 in range(0, V, o.vocab_block):
            v1 = min(V, v0 + o.vocab_block)
            tb = t[:, v0:v1]
            wb = wt[v0:v1] if wt is not None else weight[v0:v1].to(tdt)
            if bt is None:
                torch.mm(hc, wb.t(), out=tb)
            else:
                torch.addmm(bt[v0:v1], hc, wb.t(), out=tb)
            fold(tb, yc, v0, st, o.logprob)
        if tw is not None and cpu_lowp:
            lowp_grads(t, hc, yc, ic, st.lse2(), tw)
        elif tw is not None:
            grad(t, t, yc, 0, st.lse2(), tw, None, None, o.logprob)
        return st.logprob()

    def sweep(sel, tok_w):
        """Log-probs of the labelled tokens idx[sel]; with tok_w [len], also their gradient
        contributions tok_w·(onehot − p) added to gh, gw and gb."""
        ids = idx[sel]
        out = torch.empty(ids.numel(), dtype=torch.float32, device=dev)
        for i0 in range(0, ids.numel(), o.rows):
            ic = ids[i0:i0 + o.rows]
            n = ic.numel()
            hc = h2.index_select(0, ic).to(tdt)
            yc = y.index_select(0, ic)
            t = tile[:n]
            tw = tok_w[i0:i0 + n].contiguous() if tok_w is not None else None
            out[i0:i0 + n] = score_tile(t, hc, yc, tw, ic)
            if tw is not None and not cpu_lowp:
                g_t = t if tdt == torch.float32 else t.to(tdt)
                if gh is not None:
                    gh.index_copy_(0, ic, _mm32(g_t, weight if wt is not None
                                                else weight.to(tdt)))
                if gw is not None:
                    _addmm32(gw, g_t.t(), hc)
                if gb is not None:
                    gb.add_(t.sum(0))
        return out

    # The pair with the most labelled tokens goes unscaled into the empty accumulators
    # (its scalar gradient is known only after its last token); every other sequence is
    # scored first, forward only, so that its scalar is known when its gradient sweep runs.
    # U: both sequences of that pair (tied) or its chosen one (untied); R: the rest.
    p = int((counts[:B] + counts[B:]).argmax()) if B > 1 else 0
    pair = (sid == p) | (sid == p + B)
    in_u = pair if o.norm in ("unit", "count") else sid == p
    u_sel, r_sel = in_u.nonzero().squeeze(1), (~in_u).nonzero().squeeze(1)
    if o.norm in ("unit", "count"):
        # tied: dL/dr = −(a_r/a_c)·dL/dc, so the pair's tokens carry ±a_s·w_s. The tie is a
        # property of the loss type (registry: LossSpec.tie); tests check every tied type against the
        # recompute. No run-time check: it would be a sync, and NaN inputs would trip it.
        a = per if o.norm == "count" else torch.ones(S, device=dev)
        sign = torch.where(sid < B, 1.0, -1.0)
        tok_u = (sign * w[sid] * a[sid]).index_select(0, u_sel)
    else:
        a = torch.ones(S, device=dev)
        tok_u = w[sid].index_select(0, u_sel)
    # per-token log-probs of ~1e2 summed over up to 1e5 tokens: accumulate in float64
    sums64 = torch.zeros(S, dtype=torch.float64, device=dev)
    sums64.index_add_(0, sid[r_sel], sweep(r_sel, None).double())
    sums64.index_add_(0, sid[u_sel], sweep(u_sel, tok_u).double())
    sums = sums64.float()
    logps = (sums / counts_f.clamp(min=1) if o.average else sums).requires_grad_()
    with torch.enable_grad():
        loss, _ = o.loss_fn(logps, counts_f)
        g = torch.autograd.grad(loss, logps, allow_unused=True)[0]
    g = torch.zeros(S, device=dev) if g is None else g
    k = g[p] / a[p]
    for buf in (gh, gw, gb):
        if buf is not None:
            buf.mul_(k)
    if r_sel.numel():
        sweep(r_sel, (g * w)[sid].index_select(0, r_sel))
    return loss.detach(), sums, counts, gh, gw, gb


class _SinglePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, seg, o: SinglePassOptions):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        loss, sums, counts, gh, gw, gb = _grads(hidden, weight, labels, bias, seg, o, need_h,
                                                need_w, need_b)
        # The gradients go back scaled in place (no second [V, H] buffer). They are held on ctx,
        # not saved for backward (a saved tensor changed in place fails autograd's version
        # check); a second backward (retain_graph=True) forms them again from the inputs.
        ctx.bufs = (gh, gw, gb)
        ctx.save_for_backward(hidden, weight, labels, bias, seg)
        ctx.o, ctx.need = o, (need_h, need_w, need_b)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, _gs, _gc):
        hidden, weight, labels, bias, seg = ctx.saved_tensors
        bufs, ctx.bufs = ctx.bufs, None
        if bufs is None:                  # a second backward: the first scaled them in place
            bufs = _grads(hidden.detach(), weight.detach(), labels,
                          bias.detach() if bias is not None else None, seg, ctx.o,
                          *ctx.need)[3:]
        scale = grad_loss.to(torch.float32)
        gh, gw, gb = (b.mul_(scale) if b is not None else None for b in bufs)
        return (gh.view(hidden.shape).to(hidden.dtype) if gh is not None else None,
                gw.to(weight.dtype) if gw is not None else None, None,
                gb.to(bias.dtype) if gb is not None else None, None, None)


def single_pass_loss(hidden, weight, labels, bias, seg, o: SinglePassOptions):
    """(loss, sums [2B], counts [2B]) for B pairs (seg: each token's sequence in [0, 2B));
    loss differentiable w.r.t. hidden, weight, bias. The callers (preference_loss) have checked
    shapes, dtypes, devices and segment ids; the label range is checked here, as the generic
    op's launcher does, before any tile is formed."""
    check_label_range(labels.reshape(-1), weight.shape[0], o.logprob.ignore_index)
    return _SinglePass.apply(hidden, weight, labels.long(), bias, seg.long(), o)
