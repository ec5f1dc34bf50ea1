"""The single pass's full-vocabulary tiles (alignkit/ops/pair_pass.py and token_pass.py drive them): each
[rows, V] tile formed once from hidden rows, folded into its rows' log-prob (and entropy)
statistics, turned in place into G = g_lp·(onehot − p) − g_ent·p·(log p + H) where the rows'
coefficients are known, and fed to the two gradient GEMMs (G·W, Gᵀ·h); or, for rows whose
coefficient is known only later, G formed with a unit coefficient and kept (finish_kept).

With sums=True (sft_loss: label smoothing, z-loss) each row also gets lse = log Σ_v exp z_v and
zsum = Σ_v z_v (zsum=False: lse only), and its coefficients may carry dL/dlse and dL/dzsum:
    dL/dz_v = g_lp·(onehot − p_v) + g_lse·p_v + g_sum          (∂lse/∂z_v = p_v, ∂zsum/∂z_v = 1)
served by the tile kernels unchanged (no new kernel, no extra GEMM, no ABI change): the kernel
forms (g_lp − g_lse)·(onehot − p), the one-hot part is put right at one element a row
(+ g_lse·dz/dx at the label), and the constant g_sum·dz/dx_v is, without a soft cap, a rank-one
term (g_sum/T)·1ᵀ: gh += c ⊗ Σ_v W_v, gW += 1_V ⊗ Σ_r c_r·h_r, gb += Σ_r c_r (O(rows·H), and one
[V, H] add at the end); under a soft cap, dz/dx_v = (1 − tanh²(x_v/c))/T varies with v, so it is
added elementwise from tanh(x/c), which the tile also sums for zsum. Without a soft cap zsum is
h·Σ_v W_v/T + Σ_v b_v/T (no pass over the tile).
"""
from __future__ import annotations

import torch

from alignkit.ops import triton_path
from alignkit.ops.backends import gemm_dtype, resolve
from alignkit.ops.gemm32 import addmm32, mm32
from alignkit.ops.tile_kernels import KERNELS, RowStats


class VocabTiles:
    """The single pass's tile machinery over the labelled tokens idx of hidden [N, H]: each
    full-vocabulary tile is formed once (its logits a vocab block at a time), folded into its
    rows' statistics, and, where the rows' gradient coefficients are known, turned in place into
    G = g_lp·(onehot − p) − g_ent·p·(log p + H) and fed to the two gradient GEMMs, accumulating
    gh [N, H], gw [V, H] and gb [V] (fp32; None where not needed).

    grad_W is not zeroed up front: its first GEMM writes it (beta = 0) and later ones add. A
    [V, H] fp32 zero fill is a pass over the largest gradient for nothing (32 MiB, ~6 ms at
    V=32000, H=256: ~1% of the trainer's fp32 step; bench/RESULTS.md). Read from outside,
    ``gw`` is zeroed first if nothing has written it yet."""

    def __init__(self, hidden, weight, labels, bias, idx, lp_opts, rows, vocab_block,
                 need_h, need_w, need_b, entropy=False, keep=0, sums=False, zsum=True):
        H, V = weight.shape[1], weight.shape[0]
        self.sums, self._wsum, self._u, self._extra, self._c = sums, None, None, None, None
        self.zsum = sums and zsum         # Σ_v z_v wanted (label smoothing); else lse only
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
        self._gw = torch.empty(V, H, **f32) if need_w else None
        self._gw_fresh = need_w           # nothing written into _gw yet (see gw)
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
        self.kept_in_place = shared
        # triton with bf16 G: _logits_bwd writes G in bf16 straight from the fp32 tile into
        # gbuf (or into the kept rows), not over the tile and then cast: per element 4 bytes
        # read and 2 written, against 4 + 4 then 4 + 2 (on a card the elementwise passes are
        # what the single pass adds to its three GEMMs: bench/paper.py). The kept rows share
        # gbuf's buffer: a sweep that keeps G writes no tile G, and the kept rows are read
        # (finish_kept) before the next sweep that does (pair_pass._grads, token_pass._token_grads), so
        # the tile's G rows keep G too (keep_rows counts them)
        gk = torch.empty(max(n_rows, keep), V, dtype=self.gdt, device=dev) \
            if self.backend == "triton" and self.gdt != torch.float32 else None
        self.gbuf = gk[:n_rows] if gk is not None else None
        self.kept = None if not keep else (work[:keep] if shared else gk[:keep])
        self._kept_live = False           # kept rows swept, not yet finished (see sweep)
        self.vb = vb = min(vocab_block, V)
        self.gblk = torch.empty(n_rows, vb, **f32) if self.cpu_lowp else None
        self.gblk_lp = torch.empty(n_rows, vb, dtype=self.tdt, device=dev) if self.cpu_lowp \
            else None
        self.wt = weight if weight.dtype == self.tdt else None  # else W converted per block
        self.w_g = None                                          # W for the gradient GEMMs
        self.bt = bias if bias is None or bias.dtype == self.tile.dtype else \
            bias.to(self.tile.dtype)

    @property
    def gw(self):
        """grad_W's fp32 accumulator [V, H] (None where not needed), zeroed if no GEMM has
        written it yet."""
        if self._gw_fresh:
            self._gw.zero_()
            self._gw_fresh = False
        if self._u is not None:         # the rank-one term of the rows' g_sum (see module doc)
            self._gw.add_(self._u)
            self._u = None
        return self._gw

    def _gw_addmm(self, a, b):
        """gw += a·b: the first write sets it."""
        addmm32(self._gw, a, b, first=self._gw_fresh)
        self._gw_fresh = False

    def _gw_blocks(self):
        """For a pass over every vocab block (the CPU bf16 paths): the block update, copy_ while
        nothing has been written, else add_; grad_W counts as written once the pass is over."""
        first = self._gw_fresh
        self._gw_fresh = False
        return (lambda v0, v1, x: self._gw[v0:v1].copy_(x)) if first else \
            (lambda v0, v1, x: self._gw[v0:v1].add_(x))

    def _lowp_grads(self, t, hc, yc, ic, lse2, g_lp, ent, g_ent, keep=False, fix=(None, None)):
        """CPU bf16: per vocab block, G from the kept bf16 logits (fp32), cast, then gh[ic] +=
        G·W_blk and gw_blk += Gᵀ·h as bf16 GEMMs (fp32 accumulation inside, bf16 out, added into
        the fp32 accumulators a block at a time: no second [V, H] buffer). keep: G (bf16)
        replaces the block's logits in t, for finish_kept; no GEMM."""
        n, V = t.shape[0], self.V
        ghc = torch.zeros(n, self.H, dtype=torch.float32, device=self.dev) \
            if self.gh is not None and not keep else None
        gw_add = self._gw_blocks() if self._gw is not None and not keep else None
        for v0 in range(0, V, self.vb):
            v1 = min(V, v0 + self.vb)
            g, gl = self.gblk[:n, :v1 - v0], self.gblk_lp[:n, :v1 - v0]
            self.grad(t[:, v0:v1], g, yc, v0, lse2, g_lp, ent, g_ent, self.o)
            _fix(g, yc, v0, *fix)
            if keep:
                t[:, v0:v1].copy_(g)
                continue
            if self.gb is not None:
                self.gb[v0:v1] += g.sum(0)
            gl.copy_(g)
            if ghc is not None:
                ghc.add_(gl @ self.weight[v0:v1])
            if gw_add is not None:
                gw_add(v0, v1, gl.t() @ hc)
        if ghc is not None:
            self.gh.index_copy_(0, ic, ghc)

    def _score(self, t, hc, yc, ic, coef, i0, keep=False, g_out=None):
        """Log-probs (and entropies) of the tile's rows; with coef, their gradient too (with
        keep, G only, left in t for finish_kept on CPU bf16). g_out: where triton writes G
        (default: over t). With sums, the rows' (lse, zsum, top1) go to self._extra."""
        o, V = self.o, self.V
        if self.backend == "triton":
            # one vendor GEMM for the fp32 tile (fp32 logits whatever the inputs' dtype: the
            # log-softmax then runs on fp32, where a bf16 tile would round them ~5e-3 off), then
            # the logits kernels: the row statistics, then G (entropy term included) in place
            mm32(hc, self.weight.t(), out=t)
            if self.bias is not None:
                t.add_(self.bias)
            lp, m, logs, ent = triton_path.logits_forward(t, yc, o.inv_temp, o.ignore_index,
                                                          o.cap)
            ent = ent if self.entropy else None
            th = self._row_sums(t, hc, m + logs, (lp + logs) >= 0)
            g_lp, g_ent, g_lse, g_sum = self._coef(coef, ic, lp, ent, i0)
            if g_lp is not None:
                g_k, fix = self._prep(t, yc, th, g_lp, g_lse, g_sum)
                out = t if g_out is None else g_out
                triton_path.logits_backward(t, out, yc, m, logs, g_k,
                                            ent if g_ent is not None else None, g_ent,
                                            o.inv_temp, o.cap)
                _fix(out, yc, 0, *fix)
                self._rank_one(ic, hc, g_sum, th)
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
        th = self._row_sums(t, hc, st.m + st.s.log(), st.tgt >= st.m)
        g_lp, g_ent, g_lse, g_sum = self._coef(coef, ic, lp, ent, i0)
        if g_lp is None:
            return lp, ent, False
        ent_in = ent if g_ent is not None else None
        g_k, fix = self._prep(t, yc, th, g_lp, g_lse, g_sum)
        if self.cpu_lowp:
            self._lowp_grads(t, hc, yc, ic, st.lse2(), g_k, ent_in, g_ent, keep, fix)
        else:
            self.grad(t, t, yc, 0, st.lse2(), g_k, ent_in, g_ent, o)
            _fix(t, yc, 0, *fix)
        self._rank_one(ic, hc, g_sum, th)
        return lp, ent, True

    # ---- sums (module doc): lse and zsum per row, and their coefficients g_lse, g_sum --------
    def _row_sums(self, t, hc, lse, top1):
        """With sums: self._extra = (lse, zsum, top1) of the tile's rows; returns tanh(x/c)
        [rows, V] fp32 under a soft cap (zsum's terms, and dz/dx for g_sum), else None."""
        if not self.sums:
            return None
        o, th = self.o, None
        if not self.zsum:                 # not read (no smoothing): no tanh pass, no matvec
            zsum = torch.zeros_like(lse)
        elif o.softcap is not None:
            th = t.float().div(o.softcap).tanh_() if t.dtype != torch.float32 else \
                torch.div(t, o.softcap).tanh_()
            zsum = th.sum(1).mul_(o.softcap * o.inv_temp)
        else:
            zsum = (hc.float() @ self._wsum_()[0] + self._wsum_()[1]).mul_(o.inv_temp)
        self._extra = (lse, zsum, top1)
        return th

    def _wsum_(self):
        """(Σ_v W_v [H], Σ_v b_v) in fp32, once."""
        if self._wsum is None:
            b = self.bias.sum(dtype=torch.float32) if self.bias is not None else 0.0
            self._wsum = (self.weight.sum(0, dtype=torch.float32), b)
        return self._wsum

    def _prep(self, t, yc, th, g_lp, g_lse, g_sum):
        """Before the kernel: its coefficient g_lp − g_lse, and the fix-ups _fix applies to G
        after it: (g_lse·dz/dx at each row's label, g_sum·dz/dx_v [rows, V] under a soft cap),
        read from the raw logits t while the kernel has not overwritten them."""
        if g_lse is None and g_sum is None:
            return g_lp, (None, None)
        o, tfix, corr = self.o, None, None
        if g_lse is not None:
            xy = t.gather(1, yc[:, None]).squeeze(1).float()
            d = o.inv_temp if o.softcap is None else \
                (1 - torch.tanh(xy / o.softcap) ** 2) * o.inv_temp
            tfix = g_lse * d
            g_lp = (g_lp - g_lse).contiguous()
        if g_sum is not None and th is not None:
            corr = th.square_().neg_().add_(1).mul_((g_sum * o.inv_temp)[:, None])
        return g_lp, (tfix, corr)

    def _rank_one(self, ic, hc, g_sum, th):
        """Without a soft cap, g_sum's term of G is the constant c = g_sum/T a row: added to the
        GEMMs' results (gh, gW via self._u, gb) instead of to G; sweep applies it to gh after
        the tile's G·W (which writes those rows)."""
        self._c = None
        if g_sum is None or th is not None:
            return
        c = g_sum.float() * self.o.inv_temp
        if self.gh is not None:
            self._c = c
        if self._gw is not None:
            u = c @ hc.float()
            self._u = u if self._u is None else self._u.add_(u)
        if self.gb is not None:
            self.gb.add_(c.sum())

    def _coef(self, coef, ic, lp, ent, i0):
        """(g_lp, g_ent, g_lse, g_sum) of the tile's rows (None where absent). With sums, a
        callable coef takes (ic, lp, ent, lse, zsum) and returns all four."""
        if coef is None:
            return None, None, None, None
        if callable(coef):
            if self.sums:
                lse, zsum, _ = self._extra
                return coef(ic, lp, ent, lse, zsum)
            return (*coef(ic, lp, ent), None, None)
        return coef[i0:i0 + ic.numel()].contiguous(), None, None, None

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
        if keep:
            self._kept_live = True
        elif self._kept_live and ids.numel():
            # the kept rows share memory with the tile (formed in place) or with gbuf (triton)
            raise RuntimeError("VocabTiles: a sweep ran before finish_kept read the kept rows "
                               "it would overwrite")
        f32 = dict(dtype=torch.float32, device=self.dev)
        out = torch.empty(ids.numel(), **f32)
        ents = torch.empty(ids.numel(), **f32) if self.entropy else None
        if self.sums:     # lse, zsum, top1 of idx[sel] (module doc)
            self.sums_out = (torch.empty(ids.numel(), **f32), torch.empty(ids.numel(), **f32),
                             torch.empty(ids.numel(), dtype=torch.bool, device=self.dev))
        for i0 in range(0, ids.numel(), self.rows):
            ic = ids[i0:i0 + self.rows]
            n = ic.numel()
            hc = self.h2.index_select(0, ic).to(self.tdt)
            yc = self.y.index_select(0, ic)
            t = self.kept[i0:i0 + n] if keep and self.kept_in_place else self.tile[:n]
            g_out = None if self.gbuf is None else (
                self.kept[i0:i0 + n] if keep else self.gbuf[:n])
            self._c = None
            lp, ent, formed = self._score(t, hc, yc, ic, coef, i0, keep, g_out)
            out[i0:i0 + n] = lp
            if ents is not None:
                ents[i0:i0 + n] = ent
            if self.sums:
                for buf, x in zip(self.sums_out, self._extra):
                    buf[i0:i0 + n] = x
            # keep: G is in the kept rows already (formed in place, or triton's g_out); CPU
            # bf16 ran its GEMMs a vocab block at a time (_lowp_grads)
            if formed and not self.cpu_lowp and not keep:
                g_t = t if g_out is None else g_out
                if self.gh is not None:
                    self.gh.index_copy_(0, ic, mm32(g_t, self._w_g()))
                if self._gw is not None:
                    self._gw_addmm(g_t.t(), hc.to(self.gdt))
                if self.gb is not None:
                    self.gb.add_(g_t.sum(0, dtype=torch.float32))
            if self._c is not None:       # g_sum's rank-one term of gh (_rank_one)
                self.gh.index_add_(0, ic, self._c[:, None] * self._wsum_()[0][None, :])
        return out, ents

    def finish_kept(self, sel, scale):
        """The kept G rows of idx[sel] (swept with keep=True), each times its scale [len(sel)]
        (its sequence's dL/dlogp, known now): gh[rows] = s·(G·W), gw += Gᵀ·(s·h), gb += Gᵀ·s.
        The scale goes on the [n, H] side of each GEMM, not on the [n, V] G. A tile's rows at a
        time, so the [rows, H] temporaries stay within the 0.3·grad_h the memory bound leaves
        beside the keep budget (0.3·grad_W)."""
        self._kept_live = False
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
                self.gh.index_copy_(0, ids, mm32(K, self._w_g()).mul_(s32[:, None]))
            if self._gw is not None:
                self._gw_addmm(K.t(), hs)
            if self.gb is not None:
                self.gb.add_(s32 @ (K if K.dtype == torch.float32 else K.float()))

    def _finish_lowp(self, K, ids, s32, hs):
        """finish_kept's CPU bf16 chunk: a vocab block at a time, as _lowp_grads (the bf16
        GEMMs' outputs are one block's, added into the fp32 accumulators)."""
        ghk = torch.zeros(ids.numel(), self.H, dtype=torch.float32, device=self.dev) \
            if self.gh is not None else None
        gw_add = self._gw_blocks() if self._gw is not None else None
        for v0 in range(0, self.V, self.vb):
            v1 = min(self.V, v0 + self.vb)
            kb = K[:, v0:v1]
            if ghk is not None:
                wb = self.wt[v0:v1] if self.wt is not None else self.weight[v0:v1].to(self.tdt)
                ghk.add_(kb @ wb)
            if gw_add is not None:
                gw_add(v0, v1, kb.t() @ hs)
            if self.gb is not None:
                self.gb[v0:v1] += s32 @ kb.float()
        if ghk is not None:
            self.gh.index_copy_(0, ids, ghk.mul_(s32[:, None]))


def _fix(g, yc, v0, tfix, corr):
    """G [rows, w] of vocab columns [v0, v0 + w) += the sums' fix-ups (VocabTiles._prep):
    tfix [rows] at each row's label (where it falls in this block), corr [rows, V] elementwise."""
    w = g.shape[1]
    if corr is not None:
        g.add_(corr[:, v0:v0 + w])
    if tfix is not None:
        loc = yc - v0
        hit = (loc >= 0) & (loc < w)
        g.scatter_add_(1, loc.clamp(0, w - 1)[:, None],
                       torch.where(hit, tfix, 0.0)[:, None].to(g.dtype))
