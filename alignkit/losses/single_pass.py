"""Single-pass gradients for one preference pair per call: each logits tile is computed once.

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
After the last tile the loss and k are known; backward only scales grad_h and A by k·grad_out.
Three GEMMs per tile instead of the recompute path's four, and no tile is computed twice.

Memory: A ([V, H] fp32, returned as grad_W), the [N, H] hidden-gradient buffer (returned as
grad_h) and one [rows, V] fp32 tile: rows = tile budget / (4V), whatever T is. One pair per call
is what keeps it at one accumulator: with B pairs each pair's k differs, so B accumulators (or
a [T, V] tile per pair) would be needed (fused.py has the arithmetic).

Tied (one sweep, every tile once): SimPO; DPO types that are a function of the log-ratio
difference (sigmoid incl. cDPO, hinge, robust, exo_pair, discopop, aot, aot_unpaired; ipo and
sigmoid_norm with the count normalisation), alone or combined.

Untied (any other loss of the pair: DPO with sft, nca_pair, bco_pair, sppo_hard, apo_*, CPO and
ORPO with their NLL term): dL/dc and dL/dr are two unrelated scalars, so the order does it
without a second accumulator. (1) The rejected sequence, forward only: its log-prob. (2) The
chosen sequence in a single pass, unscaled, into A (= grad_W) and its grad_h rows. (3) Both
log-probs known: the loss, dL/dc and dL/dr; A, grad_b and the chosen grad_h rows are scaled by
dL/dc in place. (4) The rejected sequence again, its tiles scaled by dL/dr as they are formed.
GEMMs: 3 per chosen tile, 4 per rejected one (its logits twice): (3C + 4R) / 3(C + R), about
1.17x the three-GEMM floor for equal lengths, against the recompute's 4/3; memory as above.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.ops.backends import resolve
from alignkit.ops.options import LogprobOptions
from alignkit.ops.tile_kernels import KERNELS, RowStats

_UNIT = {"sigmoid", "hinge", "robust", "exo_pair", "discopop", "aot", "aot_unpaired"}
_COUNT = {"ipo", "sigmoid_norm"}
DEFAULT_TILE_BYTES = 64 << 20      # single_pass_probe: full-vocabulary tiles want many rows


def tile_rows(V: int) -> int:
    """Token rows per [rows, V] fp32 tile: ALIGNKIT_TILE_BYTES (default 64 MiB) / 4V."""
    return max(1, int(os.environ.get("ALIGNKIT_TILE_BYTES", DEFAULT_TILE_BYTES)) // (4 * V))


def eligibility(loss: str, own: dict) -> str:
    """How one pair's loss is done in a single pass: 'unit' or 'count' (tied: the a_s above),
    or 'untied' (any other function of the two log-probs)."""
    if loss == "simpo":
        return "unit"
    if loss != "dpo":
        return "untied"
    types = own.get("loss_type", "sigmoid")
    types = [types] if isinstance(types, str) else list(types)
    if all(t in _UNIT for t in types):
        return "unit"
    if all(t in _COUNT for t in types):
        return "count"
    return "untied"


@dataclass(frozen=True)
class SinglePassOptions:
    loss_fn: object                  # (c [1], r [1], counts [2]) -> (loss, metrics)
    average: bool
    norm: str                        # 'unit' | 'count' | 'untied'
    logprob: LogprobOptions
    rows: int                        # token rows per [rows, V] tile


class _SinglePassPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, seg, o: SinglePassOptions):
        H = weight.shape[1]
        V = weight.shape[0]
        dev = hidden.device
        h2 = hidden.reshape(-1, H)
        y = labels.reshape(-1)
        s = seg.reshape(-1)
        keep = y != o.logprob.ignore_index
        counts = torch.stack([(keep & (s == 0)).sum(), (keep & (s == 1)).sum()])
        counts_f = counts.to(torch.float32)
        per = counts_f.clamp(min=1).reciprocal()
        # dlogp/dlp_t: 1 for sums, 1/|s| for averages (the loss's log-prob units)
        w = per if o.average else torch.ones(2)
        idx = keep.nonzero().squeeze(1)
        fold, grad = KERNELS[resolve(o.logprob.backend, dev)
                             if o.logprob.backend != "triton" else "torch"]
        gh = torch.zeros(h2.shape[0], H, dtype=torch.float32, device=dev)
        gw = torch.zeros(V, H, dtype=torch.float32, device=dev)
        gb = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else None
        tile = torch.empty(min(o.rows, max(idx.numel(), 1)), V, dtype=torch.float32, device=dev)

        def sweep(ids, tok_w):
            """Log-probs of the tokens `ids`; with tok_w [len(ids)], also their gradient
            contributions tok_w·(onehot − p) added to gh, gw and gb."""
            out = torch.empty(ids.numel(), dtype=torch.float32, device=dev)
            for i0 in range(0, ids.numel(), o.rows):
                ic = ids[i0:i0 + o.rows]
                n = ic.numel()
                hc = h2.index_select(0, ic).float()
                yc = y.index_select(0, ic)
                t = tile[:n]
                torch.mm(hc, weight.t(), out=t)
                if bias is not None:
                    t.add_(bias)
                st = RowStats.new(n, False, dev)
                fold(t, yc, 0, st, o.logprob)
                out[i0:i0 + n] = st.logprob()
                if tok_w is not None:
                    grad(t, t, yc, 0, st.lse2(), tok_w[i0:i0 + n].contiguous(), None, None,
                         o.logprob)
                    gh.index_copy_(0, ic, t @ weight)
                    gw.addmm_(t.t(), hc)
                    if gb is not None:
                        gb.add_(t.sum(0))
            return out

        def loss_grads(sums64):
            sums = sums64.float()
            logps = sums / counts_f.clamp(min=1) if o.average else sums
            c = logps[:1].clone().requires_grad_()
            r = logps[1:].clone().requires_grad_()
            with torch.enable_grad():
                loss, _ = o.loss_fn(c, r, counts_f)
                g = torch.autograd.grad(loss, (c, r), allow_unused=True)
            g_c, g_r = (torch.zeros(1) if x is None else x for x in g)
            return sums, loss, g_c, g_r

        # per-token log-probs of ~1e2 summed over up to 1e5 tokens: accumulate in float64
        sums64 = torch.zeros(2, dtype=torch.float64, device=dev)
        if o.norm in ("unit", "count"):
            # tied: dL/dr = −(a_r/a_c)·dL/dc, so one sweep with ± weights, then one scalar
            a = per if o.norm == "count" else torch.ones(2)
            sgn = s.index_select(0, idx)
            tok_w = torch.stack([w[0] * a[0], -w[1] * a[1]]).index_select(0, sgn)
            lp = sweep(idx, tok_w)
            sums64.index_add_(0, sgn, lp.double())
            sums, loss, g_c, g_r = loss_grads(sums64)
            k = g_c / a[0]
            if not torch.allclose(g_r, -k * a[1], rtol=1e-4, atol=1e-12):
                raise RuntimeError("single-pass: the loss's gradients of chosen and rejected are "
                                   f"not tied as assumed ({g_c.item()}, {g_r.item()}); use "
                                   "grad_mode='recompute'")
        else:
            # untied: the rejected log-prob first (forward only), then chosen with its weights
            # unscaled, scaled once both are known, then rejected with its now-known scale
            idx_c, idx_r = idx[s.index_select(0, idx) == 0], idx[s.index_select(0, idx) == 1]
            sums64[1] = sweep(idx_r, None).double().sum()
            sums64[0] = sweep(idx_c, w[0].expand(idx_c.numel())).double().sum()
            sums, loss, g_c, g_r = loss_grads(sums64)
            gw.mul_(g_c)
            if gb is not None:
                gb.mul_(g_c)
            gh.index_copy_(0, idx_c, gh.index_select(0, idx_c).mul_(g_c))
            sweep(idx_r, (w[1] * g_r).expand(idx_r.numel()))
            k = torch.ones(1)
        ctx.save_for_backward(gh, gw, gb, k)
        ctx.meta = (hidden.shape, hidden.dtype, weight.dtype, bias.dtype if bias is not None
                    else None)
        ctx.mark_non_differentiable(sums, counts)
        return loss.detach(), sums, counts

    @staticmethod
    def backward(ctx, grad_loss, _gs, _gc):
        gh, gw, gb, k = ctx.saved_tensors
        shape, hdt, wdt, bdt = ctx.meta
        scale = (k * grad_loss).to(torch.float32)
        gh_out = gw_out = gb_out = None
        if ctx.needs_input_grad[0]:
            gh_out = gh.mul_(scale).view(shape).to(hdt)
        if ctx.needs_input_grad[1]:
            gw_out = gw.mul_(scale).to(wdt)
        if gb is not None and ctx.needs_input_grad[2]:
            gb_out = gb.mul_(scale).to(bdt)
        return gh_out, gw_out, gb_out, None, None, None


def single_pass_pair(hidden, weight, bias, labels, seg, o: SinglePassOptions):
    """(loss, sums [2], counts [2]) for one pair; loss differentiable w.r.t. hidden, weight, bias."""
    return _SinglePassPair.apply(hidden, weight, bias, labels, seg, o)
