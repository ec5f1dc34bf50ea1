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

Eligible: SimPO; DPO types that are a function of the log-ratio difference (sigmoid incl. cDPO,
hinge, robust, exo_pair, discopop, aot, aot_unpaired; ipo and sigmoid_norm with the count
normalisation), alone or combined. Not eligible (their two sequences' gradients are not tied):
sft, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, CPO and ORPO (their NLL term).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.ops.backends import resolve
from alignkit.ops.options import LogprobOptions
from alignkit.ops.tile_kernels import KERNELS, RowStats

_UNIT = {"sigmoid", "hinge", "robust", "exo_pair", "discopop", "aot", "aot_unpaired"}
_COUNT = {"ipo", "sigmoid_norm"}
DEFAULT_TILE_BYTES = 64 << 20      # single_pass_probe: full-vocabulary tiles want many rows


def eligibility(loss: str, own: dict):
    """'unit' or 'count' (the a_s above) when one pair's loss can be done in a single pass, else
    a reason string starting with 'no:'."""
    if loss == "simpo":
        return "unit"
    if loss != "dpo":
        return f"no: loss {loss!r} has an NLL term that ties its gradient to the chosen tokens"
    types = own.get("loss_type", "sigmoid")
    types = [types] if isinstance(types, str) else list(types)
    if all(t in _UNIT for t in types):
        return "unit"
    if all(t in _COUNT for t in types):
        return "count"
    return (f"no: DPO loss_type {types} is not a function of the log-ratio difference alone "
            f"(single pass serves {sorted(_UNIT)} or {sorted(_COUNT)})")


@dataclass(frozen=True)
class SinglePassOptions:
    loss_fn: object                  # (c [1], r [1], counts [2]) -> (loss, metrics)
    average: bool
    norm: str                        # 'unit' | 'count'
    logprob: LogprobOptions
    rows: int                        # token rows per [rows, V] tile


class _SinglePassPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, seg, o: SinglePassOptions):
        H = weight.shape[1]
        V = weight.shape[0]
        h2 = hidden.reshape(-1, H)
        y = labels.reshape(-1)
        s = seg.reshape(-1)
        keep = y != o.logprob.ignore_index
        counts = torch.stack([(keep & (s == 0)).sum(), (keep & (s == 1)).sum()])
        counts_f = counts.to(torch.float32)
        per = counts_f.clamp(min=1).reciprocal()
        w = (per if o.average else torch.ones(2)) * (per if o.norm == "count" else 1.0)
        row_w = torch.stack([w[0], -w[1]])                       # + chosen, − rejected
        idx = keep.nonzero().squeeze(1)
        fold, grad = KERNELS[resolve(o.logprob.backend, hidden.device)
                             if o.logprob.backend != "triton" else "torch"]
        gh = torch.zeros(h2.shape[0], H, dtype=torch.float32, device=hidden.device)
        gw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
        gb = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None \
            else None
        # per-token log-probs of ~1e2 summed over up to 1e5 tokens: accumulate in float64
        sums64 = torch.zeros(2, dtype=torch.float64, device=hidden.device)
        tile = torch.empty(min(o.rows, max(idx.numel(), 1)), V, dtype=torch.float32,
                           device=hidden.device)
        for i0 in range(0, idx.numel(), o.rows):
            ic = idx[i0:i0 + o.rows]
            n = ic.numel()
            hc = h2.index_select(0, ic).float()
            yc, sc = y.index_select(0, ic), s.index_select(0, ic)
            t = tile[:n]
            torch.mm(hc, weight.t(), out=t)
            if bias is not None:
                t.add_(bias)
            st = RowStats.new(n, False, hidden.device)
            fold(t, yc, 0, st, o.logprob)
            lp = st.logprob()
            sums64.index_add_(0, sc, lp.double())
            grad(t, t, yc, 0, st.lse2(), row_w.index_select(0, sc), None, None, o.logprob)
            gh.index_copy_(0, ic, t @ weight)
            gw.addmm_(t.t(), hc)
            if gb is not None:
                gb.add_(t.sum(0))
        sums = sums64.float()
        logps = sums / counts_f.clamp(min=1) if o.average else sums
        c = logps[:1].clone().requires_grad_()
        r = logps[1:].clone().requires_grad_()
        with torch.enable_grad():
            loss, _ = o.loss_fn(c, r, counts_f)
            g_c, g_r = torch.autograd.grad(loss, (c, r), allow_unused=True)
        g_c = torch.zeros(1) if g_c is None else g_c
        g_r = torch.zeros(1) if g_r is None else g_r
        # the accumulated gradient assumed dL/dr = −(a_r/a_c)·dL/dc; check it held
        a = per if o.norm == "count" else torch.ones(2)
        k = g_c / a[0]
        if not torch.allclose(g_r, -k * a[1], rtol=1e-4, atol=1e-12):
            raise RuntimeError("single-pass: the loss's gradients of chosen and rejected are not "
                               f"tied as assumed ({g_c.item()}, {g_r.item()}); use "
                               "grad_mode='recompute'")
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
