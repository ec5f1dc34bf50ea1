"""The distillation pass's GEMMs (alignkit/ops/distill_pass.py): both heads' logits a vocab block
at a time into the fp32 tile, each block's log-sum-exp folded while it is in cache, and the
student's two gradient GEMMs G·W_s and Gᵀ·h_s.

Where the GEMMs run, per head:
- fp32 (and float64) heads on CPU: one GEMM per vocab block of logits, folded while in cache
  (block GEMMs ran faster here than one [rows, V] GEMM: alignkit/ops/vocab_tiles.py), and the
  gradient GEMMs over the whole tile.
- every head on CUDA: one GEMM for the whole tile with fp32 output (alignkit/ops/gemm32.py: the
  vendor GEMM's out_dtype), and the gradient GEMMs over the whole tile (G cast to bf16 for
  bf16 weights; fp16 keeps fp32 G, whose small entries fp16 would flush).
- bf16 / fp16 heads on CPU: in the dtype gemm_dtype picks (bf16 on CPUs with bf16 units, fp32
  elsewhere), a vocab block at a time for the gradient GEMMs too, W converted a block at a time
  (no fp32 copy of a [V, H] head is held). torch's CPU GEMM has no fp32 output: a bf16 block's
  logits are rounded to bf16, as under autocast, and its gradient products are added into the
  fp32 accumulators a block at a time, as the engine's single pass does (alignkit/ops/
  vocab_tiles.py).
"""
from __future__ import annotations

import torch

from alignkit.ops.backends import gemm_dtype
from alignkit.ops.divergence import fold_lse
from alignkit.ops.gemm32 import addmm32, mm32


class _Head:
    def __init__(self, h, w, b, dt):
        self.h, self.w = h.reshape(-1, h.shape[-1]), w
        self.blocked = w.device.type != "cuda" and w.dtype not in (torch.float32, torch.float64)
        # the GEMM operands' dtype: the tile's, or (blocked) what the CPU multiplies fast
        self.gd = gemm_dtype(w.dtype, w.device) if self.blocked else (
            w.dtype if w.device.type == "cuda" and dt == torch.float32 else dt)
        self.wg = w if w.dtype == self.gd or self.blocked else w.to(self.gd)
        self.b = None if b is None else b.to(dt)

    def rows(self, ic):
        return self.h.index_select(0, ic).to(self.gd)

    def w_block(self, v0, v1):
        wb = self.wg[v0:v1]
        return wb if wb.dtype == self.gd else wb.to(self.gd)


class HeadGemms:
    """One call's GEMMs: hs/ws/bs the student's head, ht/wt/bt the teacher's; dt the tile's
    dtype (fp32; float64 for float64 inputs); vb the vocab block."""

    def __init__(self, hs, ws, bs, ht, wt, bt, dt, vb):
        self.s, self.t = _Head(hs, ws, bs, dt), _Head(ht, wt, bt, dt)
        self.dt, self.vb, self.V = dt, vb, ws.shape[0]
        # G's dtype in the whole-tile gradient GEMMs: bf16 with bf16 weights on CUDA (tensor
        # cores, fp32 output), else the tile's
        self.gdt = torch.bfloat16 if ws.device.type == "cuda" and ws.dtype == torch.bfloat16 \
            else dt

    def logits(self, z, hc, head: _Head, inv_t: float, tmp):
        """z [n, V] = (hc·Wᵀ + b)·inv_t, a vocab block at a time, each block's log-sum-exp folded
        while it is in cache; returns it as (max, log Σ exp(z − max)) [n] (fold_lse)."""
        n, f = z.shape[0], dict(dtype=self.dt, device=z.device)
        m, acc = torch.full((n,), -torch.inf, **f), torch.zeros(n, **f)
        if z.is_cuda:
            # one GEMM for the whole tile on a card (block GEMMs would each be a small launch),
            # into the contiguous tile; the folds then read it a block at a time
            mm32(hc, head.wg.t(), out=z)
            if head.b is not None:
                z.add_(head.b)
            if inv_t != 1.0:
                z.mul_(inv_t)
            for v0 in range(0, self.V, self.vb):
                fold_lse(z[:, v0:min(self.V, v0 + self.vb)], m, acc, tmp)
            return m, acc.log_()
        for v0 in range(0, self.V, self.vb):
            v1 = min(self.V, v0 + self.vb)
            zb, wb = z[:, v0:v1], head.w_block(v0, v1)
            b = None if head.b is None else head.b[v0:v1]
            if zb.dtype == hc.dtype == wb.dtype:
                if b is None:
                    torch.mm(hc, wb.t(), out=zb)
                else:
                    torch.addmm(b, hc, wb.t(), out=zb)
                    b = None
            else:                                        # a bf16 GEMM on CPU: bf16 out
                zb.copy_(hc @ wb.t())
            if b is not None:
                zb.add_(b)
            if inv_t != 1.0:
                zb.mul_(inv_t)
            fold_lse(zb, m, acc, tmp)
        return m, acc.log_()

    def grads(self, G, hc, ic, c, gh, gw, gb, first: bool):
        """gh[ic] = c·G·W_s, gw (+)= Gᵀ·(c·hc) (written where first), gb += c·Σ_rows G; c: the
        0-dim scale of every G element (applied on the [n, H] side)."""
        s = self.s
        hsc = (hc.to(self.dt) * c)
        if s.blocked:
            hsc = hsc.to(s.gd)
            ghc = torch.zeros(G.shape[0], s.w.shape[1], dtype=self.dt, device=G.device) \
                if gh is not None else None
            for v0 in range(0, self.V, self.vb):
                v1 = min(self.V, v0 + self.vb)
                g = G[:, v0:v1].to(s.gd)
                if ghc is not None:
                    ghc.add_(g @ s.w_block(v0, v1))
                if gw is not None:
                    gw[v0:v1].copy_(g.t() @ hsc) if first else gw[v0:v1].add_(g.t() @ hsc)
            if ghc is not None:
                gh.index_copy_(0, ic, ghc.mul_(c))
        else:
            g = G if G.dtype == self.gdt else G.to(self.gdt)
            wg = s.wg if s.wg.dtype == self.gdt else s.wg.to(self.gdt)
            if self.dt == torch.float64:
                if gh is not None:
                    gh.index_copy_(0, ic, (g @ wg).mul_(c))
                if gw is not None:
                    torch.mm(g.t(), hsc, out=gw) if first else gw.addmm_(g.t(), hsc)
            else:
                if gh is not None:
                    gh.index_copy_(0, ic, mm32(g, wg).mul_(c))
                if gw is not None:
                    addmm32(gw, g.t(), hsc.to(self.gdt), first=first)
        if gb is not None:
            gb.add_(G.sum(0).mul_(c))
