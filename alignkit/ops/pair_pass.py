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
whatever T and B are: the tile and the kept G rows share it. The triton backend in bf16: the
fp32 tile, and one bf16 buffer that holds the tile's G rows and the kept ones (keep_rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.ops.options import LogprobArgs
from alignkit.ops.pass_autograd import eager_autograd, needs, scaled_grads, stash
from alignkit.ops.validate import compact, labelled_per_segment
from alignkit.ops.vocab_tiles import VocabTiles


@dataclass(frozen=True)
class PairPassSpec:
    """What one pair-pass call runs: the loss's math (loss_fn) and layout, and the tile sizes of
    the plan the chooser took (from that plan's TileOptions). Built per call by the front door
    (preference_loss); not an options object (the engine's options are TileOptions)."""
    loss_fn: object                  # (logps [2B], counts [2B]) -> (loss, metrics)
    num_sequences: int               # 2B
    average: bool
    norm: str                        # 'unit' | 'count' | 'untied'
    logprob: LogprobArgs
    rows: int                        # token rows per [rows, V] tile (tile_rows)
    vocab_block: int = 2048          # columns per logits GEMM inside a tile (TileOptions)
    keep: int = 0                    # deferred token rows whose G may be kept (keep_rows)


def _grads(hidden, weight, labels, bias, seg, o: PairPassSpec, need_h, need_w, need_b):
    """The single pass of B pairs: (loss, sums, counts, gh, gw, gb), gradients of the loss formed
    here (None where not needed)."""
    S = o.num_sequences
    B = S // 2
    dev = hidden.device
    y = labels.reshape(-1)
    s = seg.reshape(-1)
    # the label range check, the labelled tokens and each sequence's count: one host read (on a
    # card, the one sync of the pass; the counts' sums size every compaction below)
    idx, counts, counts_host = labelled_per_segment(y, s, S, weight.shape[0],
                                                    o.logprob.ignore_index)
    sid = s.index_select(0, idx)                       # sequence of each labelled token
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
    p, n_u = unscaled_group(counts_host, tied)
    in_u = ((sid == p) | (sid == p + B)) if tied else sid == p
    u_sel, r_sel = compact(in_u, n_u), compact(~in_u, idx.numel() - n_u)
    n_keep = min(o.keep, r_sel.numel()) if (need_h or need_w or need_b) else 0
    k_sel, r_sel = r_sel[:n_keep], r_sel[n_keep:]
    tiles = VocabTiles(hidden, weight, labels, bias, idx, o.logprob, o.rows, o.vocab_block, need_h,
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
    logps = (sums / counts_f.clamp(min=1) if o.average else sums).detach()
    with eager_autograd(), torch.enable_grad():
        logps.requires_grad_()
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
    """(p, labelled tokens of U) from the sequences' labelled-token counts (2B host ints): U is
    the pair p with the most labelled tokens (tied; p indexes pairs) or the longest sequence p
    (untied); the first such on a tie."""
    B = len(counts) // 2
    sizes = [counts[i] + counts[i + B] for i in range(B)] if tied else list(counts)
    p = max(range(len(sizes)), key=sizes.__getitem__)
    return p, sizes[p]

class _SinglePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, seg, o: PairPassSpec):
        need = needs(ctx, bias)
        loss, sums, counts, gh, gw, gb = _grads(hidden, weight, labels, bias, seg, o, *need)
        stash(ctx, (gh, gw, gb), _grads, o, need, hidden, weight, labels, bias, seg)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, _gs, _gc):
        return scaled_grads(ctx, grad_loss)


def single_pass_loss(hidden, weight, labels, bias, seg, o: PairPassSpec):
    """(loss, sums [2B], counts [2B]) for B pairs (seg: each token's sequence in [0, 2B));
    loss differentiable w.r.t. hidden, weight, bias. The callers (preference_loss) have checked
    shapes, dtypes, devices and segment ids; the label range is checked in _grads, as the
    generic op's launcher does, before any tile is formed (in the pass's one host read)."""
    return _SinglePass.apply(hidden, weight, labels.long(), bias, seg.long(), o)
