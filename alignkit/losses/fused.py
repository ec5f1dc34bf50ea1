"""Fused preference losses straight from hidden states: no [tokens x vocab] logits, ever.

Layout: sequences 0..B-1 are the chosen responses of pairs 0..B-1, sequences B..2B-1 the rejected
ones; padded hidden [2B, T, H] with labels [2B, T], or packed hidden [N, H] with labels [N] and
segment_ids [N] in [0, 2B). Labels are aligned with hidden (label i is predicted from hidden i).

How the gradient is computed (the memory arithmetic; measurements in bench/RESULTS.md):
- ``grad_mode="recompute"``: the per-sequence log-probs come from the fused op
  (alignkit.ops), whose backward recomputes each logits tile: 4 GEMMs in all (h·Wᵀ twice, G·W,
  Gᵀ·h), peak memory grad_W + grad_h + one 16 MiB tile, for any T and any number of pairs.
- ``grad_mode="single_pass"`` (alignkit/ops/pair_pass.py): the gradient is formed in forward.
  A token's gradient needs its final log-sum-exp while its tile is alive (so the tile spans the
  whole vocabulary: [rows, V] fp32, rows = 64 MiB / 4V) and its sequence's scalar dL/dlogp,
  known only after the sequence's last token. One group of tokens with one unknown scalar can go
  unscaled into the empty grad_W accumulator and be scaled once: both sequences of the longest
  pair for the tied losses (SimPO, most DPO types: dL/dr = −dL/dc), the longest sequence for the
  others. Every other sequence is deferred. A second [V, H] accumulator per pair in flight would
  cost 1.8-2.0x (grad_W + grad_h) at the bench shapes against the 1.3x budget. Instead, within
  the keep budget (TileOptions.keep_bytes, default 0.3 x grad_W beyond the tile, sharing its
  buffer: the 1.3x bound holds) a deferred token's G tile is kept until its scalar is known:
  3 GEMMs. Past it the token is scored first (forward only) and formed again: 4 GEMMs.
- ``grad_mode="auto"`` (the default): the plan chooser (alignkit/ops/plan.py) takes the
  recompute, the single pass, or the single pass that keeps every deferred token, among those
  within the memory option (TileOptions.memory), by measuring them on the first calls of each
  plan key (TileOptions.autotune; the cost model without it) and caching the winner on disk.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.api import sequence_logprobs
from alignkit.losses.registry import LOSSES as REGISTRY
from alignkit.losses.ld import check_ld, ld_loss, ld_reference
from alignkit.losses.registry import PAIRED, default_average, paired_loss_on_logps
from alignkit.losses.trl_options import refusal
from alignkit.ops.backends import autocast_head, resolve
from alignkit.ops.options import LogprobArgs, TileOptions
from alignkit.ops.pair_pass import PairPassSpec, single_pass_loss
from alignkit.ops.pass_budget import (NO_GRAD, check_grad_mode, effective_mode,
                                      keep_rows, long_tiles, pass_blocker, pinned_plan, tile_rows)
from alignkit.ops.pass_op import compiled_pair_pass, register_pass_builder
from alignkit.ops.plan import candidates, choose_and_run, note, plan_key
from alignkit.ops.validate import check_linear_inputs, sequence_layout
from alignkit.ops.vocab_shard import is_dtensor, is_vocab_parallel

# options every loss takes: the reduction and the log-prob op's own options
_COMMON = ("average", "num_segments", "ignore_index", "temperature", "softcap", "backend",
           "grad_mode", "tiles")
LOSSES = PAIRED


def split_options(loss: str, options: dict):
    """Splits **loss_options into (loss kwargs, common kwargs); unknown names raise."""
    if loss not in PAIRED:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(PAIRED)} "
                         "(KTO is unpaired: use alignkit.losses.kto_loss on sequence_logprobs)")
    own = REGISTRY[loss].options
    bad = [k for k in options if k not in own and k not in _COMMON]
    for k in bad:
        why = refusal(loss, k)
        if why is not None:
            raise ValueError(f"option {k!r} (TRL's) is refused by loss {loss!r}: {why}")
    if bad:
        raise ValueError(f"option(s) {bad} do not apply to loss {loss!r}; it takes "
                         f"{', '.join(own + _COMMON)}")
    return ({k: v for k, v in options.items() if k in own},
            {k: v for k, v in options.items() if k in _COMMON})


@autocast_head
def preference_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, loss: str = "dpo",
                    ref_logprobs: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                    ref_weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    segment_ids: Optional[Tensor] = None, **loss_options):
    """Preference loss of a packed chosen/rejected batch, from hidden states.

    loss: "dpo" (sums; needs a reference), "simpo", "orpo" (per-token averages by default;
    reference-free), "cpo" (reference-free; as TRL 1.16: sums for loss_type sigmoid and hinge,
    per-token averages for ipo, simpo and alphapo). loss_options: that loss's own options (see
    dpo_loss, simpo_loss, cpo_loss, orpo_loss in alignkit.losses) plus ``average`` (override the
    reduction), ``num_segments``, ``ignore_index``, ``temperature``, ``softcap``, ``backend``,
    ``grad_mode``. An option the loss does not read raises; a TRL option alignkit refuses raises
    with the reason (alignkit/losses/trl_options.py).

    DPO's ``ld_alpha`` (LD-DPO, alignkit/losses/ld.py): the shared part of each pair's responses
    at weight 1, the tail at ld_alpha; it runs the recompute plan on 2S segments (sums only; a
    ``ref_logprobs`` must be desensitised already, e.g. by ld_sequence_logprobs).

    grad_mode: "recompute" (backward recomputes each tile), "single_pass" (the gradient is
    formed in forward from full-vocabulary tiles: 3 GEMMs per token of the longest pair (tied
    losses) or sequence (the others) and of the deferred tokens whose G tiles fit the keep
    budget (tiles.keep_bytes), 4 for the rest; see alignkit/ops/pair_pass.py; a call it
    cannot serve raises, naming why), "auto" (the default: the plan chooser, alignkit/ops/plan.py,
    within tiles.memory). tiles: alignkit.TileOptions (memory, plan, autotune, the budgets).

    Reference (DPO): ``ref_logprobs`` [2B] in the same reduction as the policy's, or
    ``ref_hidden`` (shape of hidden) with ``ref_weight`` [V, H] (and the same labels), computed
    inside without gradients and without logits.

    DPO's ``use_weighting=True`` (WPO) weights each pair by exp(mean over labelled tokens of
    log π(y_t) − log Σ_v π_v²) for chosen times rejected (detached; see dpo_loss). The log Σ p²
    term costs one extra forward GEMM over the labelled rows before the loss (no backward),
    whatever the plan; the weight is then a constant per sequence that every plan reads.

    A fully masked response has log-prob 0 and 0 tokens: its sum and its average are 0.0 and the
    loss stays finite (ORPO clamps its average just below 0, where the odds are infinite).

    Returns (loss, metrics): 0-dim loss; metrics as 0-dim detached tensors with TRL's keys
    (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected, and nll where the loss has an NLL term).
    """
    own, common = split_options(loss, loss_options)
    if "tiles" in common and common["tiles"] is None:
        del common["tiles"]
    check_linear_inputs(hidden, weight, labels, bias)
    uses_ref, default_avg = REGISTRY[loss].reference, default_average(loss, own)
    average = common.pop("average", None)
    average = default_avg if average is None else bool(average)
    num_segments = common.pop("num_segments", None)
    grad_mode = common.pop("grad_mode", "auto")
    check_grad_mode(grad_mode)          # before any work (check_ld reads it)
    _, S = sequence_layout(labels, segment_ids, num_segments, who="preference_loss",
                           hidden=hidden)
    if S == 0 or S % 2:
        raise ValueError(f"preference_loss needs an even number of sequences (B chosen, then B "
                         f"rejected); got {S}" + (" segments (max segment id + 1)"
                                                   if segment_ids is not None else " rows"))
    seq_kw = dict(segment_ids=segment_ids, num_segments=S if segment_ids is not None else None,
                  bias=bias, **common)
    ld_alpha = own.pop("ld_alpha", None)
    if ld_alpha is not None:
        check_ld(ld_alpha, own, average, grad_mode)
    if own.get("use_weighting", False):
        LogprobArgs(**common)         # bad head options raise before the extra GEMM
        if is_vocab_parallel(weight, common.get("tiles")) or is_dtensor(bias):
            raise ValueError("use_weighting (WPO) needs log Σ p² over the whole vocabulary, which "
                             "alignkit does not compute on a vocab-parallel head; it is refused")
        if "log_sum_sq_probs" in own:
            raise ValueError("log_sum_sq_probs is computed inside preference_loss from hidden "
                             "and weight (use_weighting=True); passing it is refused")
    if ld_alpha is not None:
        # LD-DPO (alignkit/losses/ld.py): 2S segments, the recompute plan
        ref = ld_reference(hidden, weight, labels, bias, S, seq_kw, ld_alpha, ref_logprobs,
                           ref_hidden, ref_weight, _reference)
        return ld_loss(loss, _with_wpo(own, hidden, weight, labels, bias, segment_ids, S,
                                       common), ld_alpha, hidden, weight, labels, seq_kw, ref)
    ref = None
    if uses_ref:
        ref = _reference(hidden, weight, labels, ref_logprobs, ref_hidden, ref_weight, bias,
                         average, seq_kw, S)
    elif ref_logprobs is not None or ref_hidden is not None or ref_weight is not None:
        raise ValueError(f"loss {loss!r} is reference-free: ref_logprobs / ref_hidden / "
                         "ref_weight would be ignored, so they are refused")
    own = _with_wpo(own, hidden, weight, labels, bias, segment_ids, S, common)
    tiles = common.get("tiles") or TileOptions()
    mode = effective_mode(grad_mode, tiles)
    # a plan pinned by tiles.plan leaves grad_mode "auto": without a gradient, the recompute
    why = pass_blocker(hidden, weight, bias, grad_mode if grad_mode != "auto" else "auto",
                       tiles) if mode != "recompute" else mode
    seg = _sequence_ids(S, labels, segment_ids) if why is None else None
    tied = REGISTRY[loss].tie(own, S // 2) != "untied"

    def recompute(h, w, b):
        sums, counts = sequence_logprobs(h, w, labels, **{**seq_kw, "bias": b})
        counts_f = counts.to(sums.dtype)
        logps = sums / counts_f.clamp(min=1) if average else sums
        return paired_loss_on_logps(loss, logps, sums, counts_f, ref, own)

    if why not in (None, NO_GRAD) and mode == "single_pass":
        raise ValueError(f"grad_mode='single_pass' / plan cannot serve this call: {why}")
    if torch.compiler.is_compiling():
        # a compiled graph cannot time candidates: the pair pass as one custom op (pass_op)
        # where the choice needs no data, one tied pair of padded rows with long tiles (every
        # token formed once); elsewhere the recompute, its own custom op
        # (a WPO call's options carry a tensor, which the custom op's spec cannot)
        if why is None and "log_sum_sq_probs" not in own and (mode == "single_pass" or (
                segment_ids is None and S == 2 and tied and long_tiles(weight, tiles))):
            return compiled_pair_pass(loss, own, common, average, S, hidden, weight, labels,
                                      bias, seg, ref, pair_loss_fn(loss, own, average, ref))
        note("recompute", "torch.compile")
        return recompute(hidden, weight, bias)
    if why is not None:
        note("recompute", "pinned" if mode == "recompute" else why)  # no gradient wanted, ...
        return recompute(hidden, weight, bias)
    t = tiles.resolved(head=tuple(weight.shape))
    rows = hidden.numel() // hidden.shape[-1]
    backend = resolve(common.get("backend", "auto"), weight.device)

    def run_pass(tt):
        return lambda h, w, b: _single_pass(loss, own, {**common, "tiles": tt}, average, S, h, w,
                                            labels, b, seg, ref)
    # the tokens whose scalar is known only at the end: all but the longest pair's (tied) or
    # sequence's (untied); bounded without reading the labels, as if the lengths were equal
    deferred = rows - rows * (2 if tied else 1) // S
    cands = candidates(weight, hidden, rows, backend, t, recompute, run_pass, deferred)
    key = plan_key("pair:tied" if tied else "pair:untied", weight.device, weight.dtype, backend,
                   *weight.shape, rows, S, t.memory)
    return choose_and_run(key, cands, t, hidden, weight, bias, rows, pinned_plan(mode, t),
                          tiles.memory_given())


def _with_wpo(own, hidden, weight, labels, bias, segment_ids, S, common):
    """own, with WPO's log_sum_sq_probs [S] when use_weighting (one extra forward GEMM)."""
    if not own.get("use_weighting", False):
        return own
    return {**own, "log_sum_sq_probs": _wpo_log_sum_sq(hidden, weight, labels, bias, segment_ids,
                                                       S, common)}


def _wpo_log_sum_sq(hidden, weight, labels, bias, segment_ids, S, common):
    """WPO's input, [S]: each sequence's sum over its labelled tokens of log Σ_v p_v² under the
    policy (temperature and soft cap applied), without gradients. Cost: one extra forward GEMM
    over the labelled rows (N·V·H multiply-adds), in tiles, no logits kept
    (alignkit.ops.vocab_stats, online log-sum-exp)."""
    from alignkit.ops.vocab_stats import vocab_row_stats
    keep = labels != common.get("ignore_index", -100)
    seq = _sequence_ids(S, labels, segment_ids)[keep].long()
    rows = hidden.detach()[keep]
    w = weight.detach()
    if rows.dtype != w.dtype:        # the head's dtype, as the op meets them under autocast
        rows = rows.to(w.dtype)
    stats = vocab_row_stats(rows, w, None if bias is None else bias.detach(),
                            temperature=common.get("temperature", 1.0),
                            softcap=common.get("softcap"), sum_sq=True)["log_sum_sq_probs"]
    return stats.new_zeros(S).index_add_(0, seq, stats)


def _sequence_ids(S, labels, segment_ids):
    """Each token's sequence: segment_ids (packed), else the row (padded [2B, T])."""
    if segment_ids is not None:
        return segment_ids
    return torch.arange(S, device=labels.device)[:, None].expand(labels.shape)


def pair_loss_fn(loss: str, own: dict, average: bool, ref: Optional[Tensor]):
    """loss_fn(logps [S], counts [S]) -> (loss, metrics): the recompute path's loss on the S
    log-probs (differentiable in logps)."""
    def loss_fn(logps, counts):
        sums = logps * counts if average else logps
        return paired_loss_on_logps(loss, logps, sums, counts, ref, own)
    return loss_fn


def pass_options(loss: str, own: dict, common: dict, average: bool, S: int, weight: Tensor,
                 ref: Optional[Tensor]) -> PairPassSpec:
    """The pair pass's options for this loss and head: its loss_fn, the tie, the tile rows and
    the keep budget (eager and compiled paths alike: the custom op rebuilds them through
    register_pass_builder)."""
    lp_opts = LogprobArgs(**common)
    V, H = weight.shape
    return PairPassSpec(
        pair_loss_fn(loss, own, average, ref), S, average, REGISTRY[loss].tie(own, S // 2),
        lp_opts, tile_rows(V, weight.device, weight.dtype, lp_opts.tiles, H=H,
                           backend=lp_opts.backend),
        lp_opts.tiles.resolved().vocab_block,
        keep_rows(V, H, weight.device, weight.dtype, lp_opts.tiles, lp_opts.backend))


register_pass_builder(pass_options)


def _single_pass(loss, own, common, average, S, hidden, weight, labels, bias, seg, ref):
    o = pass_options(loss, own, common, average, S, weight, ref)
    value, sums, counts = single_pass_loss(hidden, weight, labels, bias, seg, o)
    counts_f = counts.to(sums.dtype)
    logps = sums / counts_f.clamp(min=1) if average else sums
    _, metrics = o.loss_fn(logps, counts_f)
    return value, metrics


def logprob_loss(sums: Tensor, counts: Tensor, *, loss: str = "dpo",
                 ref_logprobs: Optional[Tensor] = None, average: Optional[bool] = None,
                 **loss_options):
    """The loss half of ``preference_loss``, on per-sequence log-prob sums.

    sums [2B] (chosen 0..B-1, then rejected), counts [2B] (response tokens per sequence);
    ``ref_logprobs`` [2B] for DPO, in the loss's reduction (sums, or averages with
    ``average=True``). For callers that computed the sums themselves (the trainer, the drop-ins).
    Returns (loss, metrics) as ``preference_loss`` does.
    """
    own, common = split_options(loss, loss_options)
    if common:
        raise ValueError(f"option(s) {sorted(common)} belong to the log-prob op, not to "
                         "logprob_loss, which starts from the sums")
    S = sums.shape[0] if isinstance(sums, Tensor) and sums.dim() == 1 else None
    if S is None or S == 0 or S % 2 or not isinstance(counts, Tensor) or counts.shape != sums.shape:
        raise ValueError("sums and counts must be 1-D tensors of one even length 2B (chosen, then "
                         f"rejected); got {getattr(sums, 'shape', sums)} and "
                         f"{getattr(counts, 'shape', counts)}")
    uses_ref, default_avg = REGISTRY[loss].reference, default_average(loss, own)
    average = default_avg if average is None else bool(average)
    counts_f = counts.to(sums.dtype)
    logps = sums / counts_f.clamp(min=1) if average else sums
    ref = None
    if uses_ref:
        if ref_logprobs is None or tuple(ref_logprobs.shape) != (S,):
            raise ValueError(f"loss {loss!r} needs ref_logprobs of shape [2B] = ({S},), got "
                             f"{None if ref_logprobs is None else tuple(ref_logprobs.shape)}")
        ref = ref_logprobs.detach().to(sums.dtype)
    elif ref_logprobs is not None:
        raise ValueError(f"loss {loss!r} is reference-free: ref_logprobs would be ignored, so it "
                         "is refused")
    return paired_loss_on_logps(loss, logps, sums, counts_f, ref, own)


def _reference(hidden, weight, labels, ref_logprobs, ref_hidden, ref_weight, bias, average,
               seq_kw, S):
    if ref_logprobs is not None:
        if ref_hidden is not None or ref_weight is not None:
            raise ValueError("give ref_logprobs or ref_hidden + ref_weight, not both")
        if not isinstance(ref_logprobs, Tensor) or tuple(ref_logprobs.shape) != (S,):
            shape = tuple(ref_logprobs.shape) if isinstance(ref_logprobs, Tensor) else ref_logprobs
            raise ValueError(f"ref_logprobs must have shape [2B] = ({S},), got {shape}")
        return ref_logprobs.detach().to(torch.float32)
    if ref_hidden is None or ref_weight is None:
        raise ValueError("DPO needs a reference: ref_logprobs [2B], or ref_hidden + ref_weight")
    if tuple(ref_hidden.shape) != tuple(hidden.shape):
        raise ValueError(f"ref_hidden must have the shape of hidden {tuple(hidden.shape)}, got "
                         f"{tuple(ref_hidden.shape)}")
    if bias is not None:
        # the API has no ref_bias: using the policy's bias, or none, would each be a silent guess
        raise ValueError("with an LM-head bias, pass the reference as ref_logprobs (the ref_hidden"
                         " path has no ref_bias argument)")
    with torch.no_grad():
        sums, counts = sequence_logprobs(ref_hidden, ref_weight, labels, **seq_kw)
    return sums / counts.clamp(min=1).to(sums.dtype) if average else sums


__all__ = ["preference_loss", "logprob_loss", "split_options", "LOSSES"]
