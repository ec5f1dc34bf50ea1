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
accumulators: the longest pair (the most labelled tokens). The other sequences' tokens are
deferred: their scalars are known only once every sequence is scored. Within the keep budget
(TileOptions.keep_bytes, keep_rows) a deferred token's G is formed once with a unit scalar and
kept, [rows, V], until the loss gives its sequence's scalar; then gh = s·(G·W) and
grad_W += Gᵀ·(s·h): 3 GEMMs. Past the budget a deferred token is scored forward only first and
its tile formed again with the scalar known: 4 GEMMs (its logits twice).

Tied (the group is the whole pair): SimPO; DPO types that are a function of the log-ratio
difference (sigmoid incl. cDPO, hinge, robust, exo_pair, discopop, aot, aot_unpaired; ipo and
sigmoid_norm with the count normalisation), alone or combined. The tie is a property of the loss
type (registry: LossSpec.tie).

Untied (any other loss of the pair: DPO with sft, nca_pair, bco_pair, sppo_hard, apo_*, CPO and
ORPO with their NLL term): dL/dc and dL/dr are two unrelated scalars, so the group is the
longest sequence alone, and every other sequence is deferred: one pair of equal lengths past the
keep budget costs (3C + 4R) / 3(C + R), about 1.17x the three-GEMM floor.

Memory: A ([V, H] fp32, returned as grad_W), the [N, H] hidden-gradient buffer (returned as
grad_h) and one [rows, V] fp32 buffer, rows = (tile budget + keep budget) / (4V) at most,
whatever T and B are: the tile and the kept G rows share it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def keep_rows(V: int, H: int, device=None, dtype: torch.dtype = torch.float32,
              tiles=None, triton: bool = False) -> int:
    """Token rows of G the single pass may keep for sequences whose scalar is not known yet.
    Where G has the tile's dtype (fp32; bf16 GEMMs on CPU) the kept rows share one buffer with
    the tile, formed in place: (tile budget + keep_bytes) / (V x itemsize), so keep_bytes is all
    the memory keeping adds, and 0 still keeps what the tile's own memory holds. The triton
    backend's bf16 G sits beside its fp32 tile, in a buffer of its own: keep_bytes / 2V.
    (TileOptions.keep_bytes; default 3/10 of grad_W.)"""
    t = (tiles or TileOptions()).resolved(head=(V, H))
    device = torch.device(device) if device is not None else torch.device("cpu")
    budget = t.gpu_chunk_bytes if device.type == "cuda" else t.single_pass_bytes
    if triton:
        if dtype == torch.bfloat16:
            return t.keep_bytes // (2 * V)
        return (budget + t.keep_bytes) // (4 * V)
    per = 2 if gemm_dtype(dtype, device) != torch.float32 else 4
    return (budget + t.keep_bytes) // (per * V)


def keep_pays(deferred: int, kept: int, n: int, H: int) -> bool:
    """auto's rule for a pass with deferred tokens (n labelled tokens, `deferred` of them with a
    scalar known only at the end, `kept` of those within the keep budget), measured on the AMX
    Xeon in fp32 (bench/RESULTS.md, "The keep budget"): every deferred token kept, or at
    H >= 1024 at most 30% of the tokens formed twice. Past that the recompute ran level or
    faster (H <= 512: the elementwise passes weigh more than the GEMM they save)."""
    return kept >= deferred or (H >= 1024 and deferred - kept <= 0.3 * n)


GRAD_MODES = ("recompute", "single_pass", "auto")


def pass_blocker(hidden, weight, bias, grad_mode: str):
    """Why a single pass (the pair pass or the token pass) cannot serve a call, or, under
    grad_mode "auto", should not; None where it can. Both front doors (preference_loss,
    policy_loss) ask this one function."""
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if len(dtypes) != 1:
        return f"hidden, weight and bias must share one dtype, got {sorted(map(str, dtypes))}"
    if dtypes == {torch.float64}:
        return "float64 inputs take the recompute (its GEMMs run in fp32 either way)"
    # no gradient wanted (no_grad, or nothing requires one): the recompute op runs forward only,
    # one GEMM per tile and no [V, H] accumulator
    if grad_mode == "auto" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return "no input requires a gradient"
    return None


def long_tiles(weight, tiles=None) -> bool:
    """Whether full-vocabulary tiles hold the >= 256 rows where the single pass's GEMMs ran at
    speed (bench/RESULTS.md, "auto re-measured"); on CPU only in fp32 (in bf16 the passes over
    the kept bf16 logits made it 5-13% slower than the recompute even with long tiles)."""
    if weight.device.type != "cuda" and weight.dtype != torch.float32:
        return False
    return tile_rows(weight.shape[0], weight.device, weight.dtype, tiles) >= 256


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
    keep: int = 0                    # deferred token rows whose G may be kept (keep_rows)


def _mm_tile(t, hc, weight):
    """t (fp32 [rows, V]) = hc·Wᵀ with fp32 accumulation and output, whatever the inputs' dtype:
    the log-softmax then runs on fp32 logits (a bf16 tile rounds them before it, ~5e-3 off)."""
    if hc.dtype == torch.float32:
        torch.mm(hc, weight.t(), out=t)
    elif hc.is_cuda:
        torch.mm(hc, weight.t(), out_dtype=torch.float32, out=t)
    else:                                 # the interpreter's CPU tensors: no fp32-output bf16 mm
        torch.mm(hc.float(), weight.t().float(), out=t)


class _Tiles:
    """The single pass's tile machinery over the labelled tokens idx of hidden [N, H]: each
    full-vocabulary tile is formed once (its logits a vocab block at a time), folded into its
    rows' statistics, and, where the rows' gradient coefficients are known, turned in place into
    G = g_lp·(onehot − p) − g_ent·p·(log p + H) and fed to the two gradient GEMMs, accumulating
    gh [N, H], gw [V, H] and gb [V] (fp32; None where not needed)."""

    def __init__(self, hidden, weight, labels, bias, idx, lp_opts, rows, vocab_block,
                 need_h, need_w, need_b, entropy=False, keep=0):
        H, V = weight.shape[1], weight.shape[0]
        dev = hidden.device
        self.h2, self.y, self.idx = hidden.reshape(-1, H), labels.reshape(-1), idx
        self.weight, self.bias, self.o, self.rows = weight, bias, lp_opts, rows
        self.entropy, self.V, self.H, self.dev = entropy, V, H, dev
        self.backend = resolve(lp_opts.backend, dev)
        self.fold, self.grad = KERNELS.get(self.backend, (None, None))
        # The GEMMs run in the inputs' dtype where that is fast (gemm_dtype: CUDA, CPUs with bf16
        # units), with fp32 accumulation; statistics, log-probs and accumulators are fp32.
        # triton: an fp32 tile (fp32-output GEMM), G cast for the two gradient GEMMs. CPU bf16:
        # the tile keeps the bf16 logits (torch's CPU GEMM has no fp32 output: they are rounded
        # to bf16, as under autocast), the fold reads them in fp32, and G is formed a vocab block
        # at a time (fp32, then cast) for that block's GEMMs: the logits are still formed once.
        self.tdt = weight.dtype if self.backend == "triton" else gemm_dtype(weight.dtype, dev)
        self.cpu_lowp = self.backend != "triton" and self.tdt != torch.float32
        f32 = dict(dtype=torch.float32, device=dev)
        self.gh = torch.zeros(self.h2.shape[0], H, **f32) if need_h else None
        self.gw = torch.zeros(V, H, **f32) if need_w else None
        self.gb = torch.zeros(V, **f32) if need_b else None
        n_rows = min(rows, max(idx.numel(), 1))
        tile_dt = self.tdt if self.cpu_lowp else torch.float32
        # G's dtype in the gradient GEMMs: bf16 for bf16 GEMMs (fp32's exponent range); in fp16
        # g·p would flush to zero below 6e-8 over most of a large vocabulary's tail, so fp16
        # keeps the fp32 tile for its GEMMs
        self.gdt = self.tdt if self.cpu_lowp else (
            torch.bfloat16 if self.tdt == torch.bfloat16 else torch.float32)
        # one buffer for the tile and the kept G rows (keep_rows): where G has the tile's dtype
        # a kept chunk is formed in place, as its own tile
        shared = self.gdt == tile_dt
        work = torch.empty(max(n_rows, keep if shared else 0), V, dtype=tile_dt, device=dev)
        self.tile = work[:n_rows]
        self.kept = None if not keep else (work[:keep] if shared else
                                           torch.empty(keep, V, dtype=self.gdt, device=dev))
        self.kept_in_place = shared
        self.vb = vb = min(vocab_block, V)
        self.gblk = torch.empty(n_rows, vb, **f32) if self.cpu_lowp else None
        self.gblk_lp = torch.empty(n_rows, vb, dtype=self.tdt, device=dev) if self.cpu_lowp \
            else None
        self.wt = weight if weight.dtype == self.tdt else None  # else W converted per block
        self.w_g = None                                          # W for the gradient GEMMs
        self.bt = bias if bias is None or bias.dtype == self.tile.dtype else \
            bias.to(self.tile.dtype)

    def _lowp_grads(self, t, hc, yc, ic, lse2, g_lp, ent, g_ent, keep=False):
        """CPU bf16: per vocab block, G from the kept bf16 logits (fp32), cast, then gh[ic] +=
        G·W_blk and gw_blk += Gᵀ·h as bf16 GEMMs (fp32 accumulation inside, bf16 out, added into
        the fp32 accumulators a block at a time: no second [V, H] buffer). keep: G (bf16)
        replaces the block's logits in t, for finish_kept; no GEMM."""
        n, V = t.shape[0], self.V
        ghc = torch.zeros(n, self.H, dtype=torch.float32, device=self.dev) \
            if self.gh is not None and not keep else None
        for v0 in range(0, V, self.vb):
            v1 = min(V, v0 + self.vb)
            g, gl = self.gblk[:n, :v1 - v0], self.gblk_lp[:n, :v1 - v0]
            self.grad(t[:, v0:v1], g, yc, v0, lse2, g_lp, ent, g_ent, self.o)
            if keep:
                t[:, v0:v1].copy_(g)
                continue
            if self.gb is not None:
                self.gb[v0:v1] += g.sum(0)
            gl.copy_(g)
            if ghc is not None:
                ghc.add_(gl @ self.weight[v0:v1])
            if self.gw is not None:
                self.gw[v0:v1].add_(gl.t() @ hc)
        if ghc is not None:
            self.gh.index_copy_(0, ic, ghc)

    def _score(self, t, hc, yc, ic, coef, i0, keep=False):
        """Log-probs (and entropies) of the tile's rows; with coef, their gradient too (with
        keep, G only, left in t for finish_kept on CPU bf16)."""
        o, V = self.o, self.V
        if self.backend == "triton":
            # one vendor GEMM for the fp32 tile, then the logits kernels: the row statistics,
            # then G (entropy term included) in place
            _mm_tile(t, hc, self.weight)
            if self.bias is not None:
                t.add_(self.bias)
            lp, m, logs, ent = triton_path.logits_forward(t, yc, o.inv_temp, o.ignore_index,
                                                          o.cap)
            ent = ent if self.entropy else None
            g_lp, g_ent = self._coef(coef, ic, lp, ent, i0)
            if g_lp is not None:
                triton_path.logits_backward(t, t, yc, m, logs, g_lp,
                                            ent if g_ent is not None else None, g_ent,
                                            o.inv_temp, o.cap)
            return lp, ent, g_lp is not None
        st = RowStats.new(t.shape[0], self.entropy, self.dev)
        # the tile's logits a vocab block at a time, each folded while it is in cache:
        # [rows, 2048] GEMMs ran 1.2-1.3x faster here than one [rows, V] GEMM (bench/
        # RESULTS.md, single pass), and the fold then reads L2, not memory
        for v0 in range(0, V, self.vb):
            v1 = min(V, v0 + self.vb)
            tb = t[:, v0:v1]
            wb = self.wt[v0:v1] if self.wt is not None else self.weight[v0:v1].to(self.tdt)
            if self.bt is None:
                torch.mm(hc, wb.t(), out=tb)
            else:
                torch.addmm(self.bt[v0:v1], hc, wb.t(), out=tb)
            self.fold(tb, yc, v0, st, o)
        lp = st.logprob()
        ent = st.entropy() if self.entropy else None
        g_lp, g_ent = self._coef(coef, ic, lp, ent, i0)
        if g_lp is None:
            return lp, ent, False
        ent_in = ent if g_ent is not None else None
        if self.cpu_lowp:
            self._lowp_grads(t, hc, yc, ic, st.lse2(), g_lp, ent_in, g_ent, keep)
        else:
            self.grad(t, t, yc, 0, st.lse2(), g_lp, ent_in, g_ent, o)
        return lp, ent, True

    @staticmethod
    def _coef(coef, ic, lp, ent, i0):
        if coef is None:
            return None, None
        if callable(coef):
            return coef(ic, lp, ent)
        return coef[i0:i0 + ic.numel()].contiguous(), None

    def _w_g(self):
        """W in G's dtype for the gradient GEMMs, converted once."""
        if self.w_g is None:
            self.w_g = self.weight if self.weight.dtype == self.gdt else self.weight.to(self.gdt)
        return self.w_g

    def sweep(self, sel, coef=None, keep=False):
        """(log-probs, entropies or None) of the labelled tokens idx[sel]. coef: None (score
        only), g_lp per token [len(sel)], or a callable (token indices, lp, ent) -> (g_lp, g_ent
        or None) of each tile's rows: their gradient contributions go into gh, gw and gb. keep:
        G is formed but left in the kept buffer (row j for sel[j]) for finish_kept, which runs
        its two GEMMs once each row's scale is known."""
        ids = self.idx[sel]
        f32 = dict(dtype=torch.float32, device=self.dev)
        out = torch.empty(ids.numel(), **f32)
        ents = torch.empty(ids.numel(), **f32) if self.entropy else None
        for i0 in range(0, ids.numel(), self.rows):
            ic = ids[i0:i0 + self.rows]
            n = ic.numel()
            hc = self.h2.index_select(0, ic).to(self.tdt)
            yc = self.y.index_select(0, ic)
            t = self.kept[i0:i0 + n] if keep and self.kept_in_place else self.tile[:n]
            lp, ent, formed = self._score(t, hc, yc, ic, coef, i0, keep)
            out[i0:i0 + n] = lp
            if ents is not None:
                ents[i0:i0 + n] = ent
            if not formed or self.cpu_lowp:
                continue
            if keep:
                if not self.kept_in_place:
                    self.kept[i0:i0 + n].copy_(t)
                continue
            g_t = t if self.gdt == torch.float32 else t.to(self.gdt)
            if self.gh is not None:
                self.gh.index_copy_(0, ic, _mm32(g_t, self._w_g()))
            if self.gw is not None:
                _addmm32(self.gw, g_t.t(), hc.to(self.gdt))
            if self.gb is not None:
                self.gb.add_(t.sum(0))
        return out, ents

    def finish_kept(self, sel, scale):
        """The kept G rows of idx[sel] (swept with keep=True), each times its scale [len(sel)]
        (its sequence's dL/dlogp, known now): gh[rows] = s·(G·W), gw += Gᵀ·(s·h), gb += Gᵀ·s.
        The scale goes on the [n, H] side of each GEMM, not on the [n, V] G. A tile's rows at a
        time, so the [rows, H] temporaries stay within the 0.3·grad_h the memory bound leaves
        beside the keep budget (0.3·grad_W)."""
        ids_all = self.idx[sel]
        s_all = scale.to(torch.float32)
        for r0 in range(0, ids_all.numel(), self.rows):
            ids, s32 = ids_all[r0:r0 + self.rows], s_all[r0:r0 + self.rows]
            K = self.kept[r0:r0 + ids.numel()]
            hs = (self.h2.index_select(0, ids).to(torch.float32) * s32[:, None]).to(self.gdt)
            if self.cpu_lowp:
                self._finish_lowp(K, ids, s32, hs)
                continue
            if self.gh is not None:
                self.gh.index_copy_(0, ids, _mm32(K, self._w_g()).mul_(s32[:, None]))
            if self.gw is not None:
                _addmm32(self.gw, K.t(), hs)
            if self.gb is not None:
                self.gb.add_(s32 @ (K if K.dtype == torch.float32 else K.float()))

    def _finish_lowp(self, K, ids, s32, hs):
        """finish_kept's CPU bf16 chunk: a vocab block at a time, as _lowp_grads (the bf16
        GEMMs' outputs are one block's, added into the fp32 accumulators)."""
        ghk = torch.zeros(ids.numel(), self.H, dtype=torch.float32, device=self.dev) \
            if self.gh is not None else None
        for v0 in range(0, self.V, self.vb):
            v1 = min(self.V, v0 + self.vb)
            kb = K[:, v0:v1]
            if ghk is not None:
                wb = self.wt[v0:v1] if self.wt is not None else self.weight[v0:v1].to(self.tdt)
                ghk.add_(kb @ wb)
            if self.gw is not None:
                self.gw[v0:v1].add_(kb.t() @ hs)
            if self.gb is not None:
                self.gb[v0:v1] += s32 @ kb.float()
        if ghk is not None:
            self.gh.index_copy_(0, ids, ghk.mul_(s32[:, None]))


def _grads(hidden, weight, labels, bias, seg, o: SinglePassOptions, need_h, need_w, need_b):
    """The single pass of B pairs: (loss, sums, counts, gh, gw, gb), gradients of the loss formed
    here (None where not needed)."""
    S = o.num_sequences
    B = S // 2
    dev = hidden.device
    y = labels.reshape(-1)
    s = seg.reshape(-1)
    idx = (y != o.logprob.ignore_index).nonzero().squeeze(1)
    sid = s.index_select(0, idx)                       # sequence of each labelled token
    counts = torch.bincount(sid, minlength=S)
    counts_f = counts.to(torch.float32)
    per = counts_f.clamp(min=1).reciprocal()
    # dlogp/dlp_t: 1 for sums, 1/|s| for averages (the loss's log-prob units)
    w = per if o.average else torch.ones(S, device=dev)
    # One group U goes unscaled into the empty accumulators (its scalar gradient is known only
    # after its last token): the pair with the most labelled tokens (tied), or the longest
    # sequence (untied). R: the rest, whose scalars are known only once every sequence is
    # scored. R's first n_keep tokens (the keep budget, keep_rows) are formed once with a unit
    # scalar and their G kept: 3 GEMMs, like U. The others are scored first, forward only, and
    # formed again once their scalars are known: 4 GEMMs.
    tied = o.norm in ("unit", "count")
    p, _ = unscaled_group(counts, tied)
    in_u = ((sid == p) | (sid == p + B)) if tied else sid == p
    u_sel, r_sel = in_u.nonzero().squeeze(1), (~in_u).nonzero().squeeze(1)
    n_keep = min(o.keep, r_sel.numel()) if (need_h or need_w or need_b) else 0
    k_sel, r_sel = r_sel[:n_keep], r_sel[n_keep:]
    tiles = _Tiles(hidden, weight, labels, bias, idx, o.logprob, o.rows, o.vocab_block, need_h,
                   need_w, need_b, keep=n_keep)

    def sweep(sel, coef, keep=False):
        return tiles.sweep(sel, coef, keep)[0]

    if tied:
        # tied: dL/dr = −(a_r/a_c)·dL/dc, so the pair's tokens carry ±a_s·w_s. The tie is a
        # property of the loss type (registry: LossSpec.tie); tests check every tied type
        # against the recompute. No run-time check: it would be a sync, and NaN inputs would trip it.
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
    if n_keep:
        sums64.index_add_(0, sid[k_sel], sweep(k_sel, w[sid].index_select(0, k_sel),
                                               keep=True).double())
    sums = sums64.float()
    logps = (sums / counts_f.clamp(min=1) if o.average else sums).requires_grad_()
    with torch.enable_grad():
        loss, _ = o.loss_fn(logps, counts_f)
        g = torch.autograd.grad(loss, logps, allow_unused=True)[0]
    g = torch.zeros(S, device=dev) if g is None else g
    k = g[p] / a[p]                    # U's scalar: tied, that of the pair's chosen sequence
    for buf in (tiles.gh, tiles.gw, tiles.gb):
        if buf is not None:
            buf.mul_(k)
    if n_keep:
        tiles.finish_kept(k_sel, g.index_select(0, sid.index_select(0, k_sel)))
    if r_sel.numel():
        sweep(r_sel, (g * w)[sid].index_select(0, r_sel))
    return loss.detach(), sums, counts, tiles.gh, tiles.gw, tiles.gb


def unscaled_group(counts, tied: bool):
    """(p, labelled tokens of U) from the sequences' labelled-token counts [2B]: U is the pair p
    with the most labelled tokens (tied; p indexes pairs) or the longest sequence p (untied)."""
    B = counts.numel() // 2
    if tied:
        per_pair = counts[:B] + counts[B:]
        p = int(per_pair.argmax()) if B > 1 else 0
        return p, int(per_pair[p])
    p = int(counts.argmax())
    return p, int(counts[p])


def _stash(ctx, bufs, form, o, need, hidden, weight, labels, bias, *extra):
    """forward's side of a pass whose gradients it formed: bufs (gh, gw, gb) go back scaled in
    place (no second [V, H] buffer). They are held on ctx, not saved for backward (a saved tensor
    changed in place fails autograd's version check); a second backward (retain_graph=True)
    forms them again from the inputs with form(hidden, weight, labels, bias, *extra, o, *need)."""
    ctx.bufs, ctx.form, ctx.o, ctx.need, ctx.n_extra = bufs, form, o, need, len(extra)
    ctx.save_for_backward(hidden, weight, labels, bias, *extra)


def _scaled_grads(ctx, grad_loss):
    """backward's side: the stashed gradients times the upstream scalar, in the inputs' dtypes."""
    hidden, weight, labels, bias, *extra = ctx.saved_tensors
    bufs, ctx.bufs = ctx.bufs, None
    if bufs is None:                  # a second backward: the first scaled them in place
        bufs = ctx.form(hidden.detach(), weight.detach(), labels,
                        bias.detach() if bias is not None else None, *extra, ctx.o,
                        *ctx.need)[-3:]
    scale = grad_loss.to(torch.float32)
    gh, gw, gb = (b.mul_(scale) if b is not None else None for b in bufs)
    return (gh.view(hidden.shape).to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None, None,
            gb.to(bias.dtype) if gb is not None else None) + (None,) * (ctx.n_extra + 1)


def _needs(ctx, bias):
    return (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3])


class _SinglePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, seg, o: SinglePassOptions):
        need = _needs(ctx, bias)
        loss, sums, counts, gh, gw, gb = _grads(hidden, weight, labels, bias, seg, o, *need)
        _stash(ctx, (gh, gw, gb), _grads, o, need, hidden, weight, labels, bias, seg)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, _gs, _gc):
        return _scaled_grads(ctx, grad_loss)


def single_pass_loss(hidden, weight, labels, bias, seg, o: SinglePassOptions):
    """(loss, sums [2B], counts [2B]) for B pairs (seg: each token's sequence in [0, 2B));
    loss differentiable w.r.t. hidden, weight, bias. The callers (preference_loss) have checked
    shapes, dtypes, devices and segment ids; the label range is checked here, as the generic
    op's launcher does, before any tile is formed."""
    check_label_range(labels.reshape(-1), weight.shape[0], o.logprob.ignore_index)
    return _SinglePass.apply(hidden, weight, labels.long(), bias, seg.long(), o)


@dataclass(frozen=True)
class TokenPassOptions:
    """A token-level loss L = Σ_t f_t(lp_t, H_t): each token's coefficients are known as soon as
    its row is scored, so every tile is formed once (3 GEMMs for any number of sequences).
    coef: (token indices, lp, ent) -> (dL/dlp, dL/dH or None) of a tile's rows; finish: (lp [N],
    ent [N] or None) -> the loss (0-dim); entropy: fold the entropy statistics.

    coupled: a loss whose dL/dlp_t is known only once every token is scored (sequence-level
    importance sampling: w_s = mean of lp − old over s), with no gradient through the entropy.
    coef is not read: dL/dlp comes from finish by autograd at the end. The first `keep` tokens
    (keep_rows) are formed once with a unit coefficient and their G kept until then (3 GEMMs);
    the others are scored first and formed again (4 GEMMs)."""
    coef: object
    finish: object
    logprob: LogprobOptions
    rows: int
    vocab_block: int = 2048
    entropy: bool = False
    coupled: bool = False
    keep: int = 0


def _token_grads(hidden, weight, labels, bias, o: TokenPassOptions, need_h, need_w, need_b):
    y = labels.reshape(-1)
    idx = (y != o.logprob.ignore_index).nonzero().squeeze(1)
    need = need_h or need_w or need_b
    M = idx.numel()
    n_keep = min(o.keep, M) if o.coupled and need else 0
    tiles = _Tiles(hidden, weight, labels, bias, idx, o.logprob, o.rows, o.vocab_block, need_h,
                   need_w, need_b, entropy=o.entropy, keep=n_keep)
    sel = torch.arange(M, device=hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)

    def full(x):                                  # labelled-token values -> [N]
        return torch.zeros(y.numel(), **f32).index_copy_(0, idx, x) if x is not None else None
    if not o.coupled:
        lp, ent = tiles.sweep(sel, o.coef if need else None)
        return o.finish(full(lp), full(ent)), full(lp), full(ent), tiles.gh, tiles.gw, tiles.gb
    # coupled: the tokens past the keep budget scored first (forward only), the kept ones
    # formed with a unit coefficient; then dL/dlp of every token from the loss, by autograd
    k_sel, r_sel = sel[:n_keep], sel[n_keep:]
    lp_r, ent_r = tiles.sweep(r_sel)
    lp_k, ent_k = tiles.sweep(k_sel, torch.ones(n_keep, **f32), keep=True)
    lp_all = full(torch.cat([lp_k, lp_r]))
    ent_all = full(torch.cat([ent_k, ent_r])) if o.entropy else None
    with torch.enable_grad():
        x = lp_all.clone().requires_grad_()
        loss = o.finish(x, ent_all)
        g = torch.autograd.grad(loss, x, allow_unused=True)[0] if need else None
    if g is not None:
        g = g.index_select(0, idx)
        if n_keep:
            tiles.finish_kept(k_sel, g[:n_keep])
        if r_sel.numel():
            tiles.sweep(r_sel, g[n_keep:].contiguous())
    return loss.detach(), lp_all, ent_all, tiles.gh, tiles.gw, tiles.gb


class _TokenPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, o: TokenPassOptions):
        need = _needs(ctx, bias)
        loss, lp, ent, gh, gw, gb = _token_grads(hidden, weight, labels, bias, o, *need)
        _stash(ctx, (gh, gw, gb), _token_grads, o, need, hidden, weight, labels, bias)
        ctx.mark_non_differentiable(lp)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return loss.detach(), lp, ent

    @staticmethod
    def backward(ctx, grad_loss, _glp, _gent):
        return _scaled_grads(ctx, grad_loss)


def token_pass_loss(hidden, weight, labels, bias, o: TokenPassOptions):
    """(loss, lp [N], ent [N] or None) of a token-level loss, its gradient w.r.t. hidden, weight
    and bias formed in the forward pass (see TokenPassOptions). The caller validated the inputs;
    the label range is checked here, before any tile is formed."""
    check_label_range(labels.reshape(-1), weight.shape[0], o.logprob.ignore_index)
    return _TokenPass.apply(hidden, weight, labels.long(), bias, o)
