"""Length-desensitised DPO's sequence log-probs (LD-DPO, Liu et al. 2024, arXiv:2409.06411), as
TRL 1.16's DPOTrainer forms them with ``ld_alpha``.

For a pair whose responses have ℓ_c and ℓ_r labelled tokens, the first min(ℓ_c, ℓ_r) labelled
tokens of each response (in order) are its *shared* part, the rest its *tail*:

    logπ_ld(y) = Σ_shared log π(y_t) + α·Σ_tail log π(y_t),      α = ld_alpha in [0, 1]

(α = 1: plain DPO; α = 0: the tail is masked). The reference's log-probs take the same form.
Each token's gradient is 1 or α times its sequence's, so the sums come from the fused op on 2S
segments (each sequence's shared part, then its tail): the recompute plan, no logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.api import sequence_logprobs
from alignkit.losses.options import check_number
from alignkit.losses.registry import paired_loss_on_logps
from alignkit.ops.plan import note


def ld_segment_ids(keep: Tensor, seq: Tensor, S: int) -> Tensor:
    """keep [N] (labelled), seq [N] (each token's sequence in [0, S), chosen 0..B-1 then
    rejected) -> [N] segment ids in [0, 2S): seq for a shared token, S + seq for a tail token
    (and for an unlabelled one, which adds nothing)."""
    keep, seq = keep.reshape(-1), seq.reshape(-1).long()
    seq_sorted, order = torch.sort(seq, stable=True)       # each sequence's tokens, in order
    k = keep[order].long()
    counts = torch.bincount(seq, weights=keep.to(torch.float64), minlength=S).long()
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(seq)
    rank[order] = torch.cumsum(k, 0) - start[seq_sorted]    # 1-based among labelled tokens
    B = S // 2
    shared = torch.minimum(counts[:B], counts[B:]).repeat(2)
    tail = ~keep | (rank > shared[seq])
    return seq + S * tail.long()


def ld_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, ld_alpha: float, *,
                         segment_ids: Optional[Tensor] = None, num_segments: Optional[int] = None,
                         **kw):
    """(ld [S], plain sums [S], counts [S]) of a chosen/rejected batch (padded [2B, T, H] or
    packed [N, H] + segment_ids), through alignkit.sequence_logprobs on 2S segments; kw: its
    options (bias, ignore_index, temperature, softcap, backend, tiles). Use it for a reference
    passed as ``ref_logprobs`` with ``ld_alpha``."""
    check_number("ld_alpha", ld_alpha, low=0, high=1)
    H = hidden.shape[-1]
    if segment_ids is None:
        S = hidden.shape[0]
        seq = torch.arange(S, device=labels.device)[:, None].expand(labels.shape)
    else:
        S = int(segment_ids.max()) + 1 if num_segments is None else num_segments
        seq = segment_ids
    keep = labels != kw.get("ignore_index", -100)
    seg = ld_segment_ids(keep, seq, S)
    sums2, counts2 = sequence_logprobs(hidden.reshape(-1, H), weight, labels.reshape(-1),
                                       segment_ids=seg, num_segments=2 * S, **kw)
    shared, tail = sums2[:S], sums2[S:]
    return shared + ld_alpha * tail, shared + tail, counts2[:S] + counts2[S:]


def check_ld(ld_alpha, own, average, grad_mode):
    """LD-DPO's limits, before any work: the sums reduction, the recompute plan, no sft term."""
    check_number("ld_alpha", ld_alpha, low=0, high=1)
    if average:
        raise ValueError("ld_alpha weights summed log-probs (TRL's DPO): average=True is refused")
    if grad_mode == "single_pass":
        raise ValueError("ld_alpha runs the recompute plan: each token's gradient is 1 or "
                         "ld_alpha times its sequence's, and the single pass keeps one scalar "
                         "per sequence; grad_mode='single_pass' is refused")
    types = own.get("loss_type", "sigmoid")
    if "sft" in ([types] if isinstance(types, str) else list(types)):
        raise ValueError("ld_alpha with loss_type 'sft' is refused: TRL's sft term reads the "
                         "un-desensitised log-probs, which the pair's loss here does not see")


def ld_reference(hidden, weight, labels, bias, S, seq_kw, ld_alpha, ref_logprobs, ref_hidden,
                 ref_weight, reference):
    """LD-DPO's reference [S]: ref_logprobs as given (already desensitised, e.g. by
    alignkit.losses.ld.ld_sequence_logprobs), or from ref_hidden + ref_weight without
    gradients; reference(...): the front door's plain reference, for its checks and messages."""
    if ref_hidden is None or ref_weight is None or ref_logprobs is not None or bias is not None \
            or tuple(ref_hidden.shape) != tuple(hidden.shape):
        return reference(hidden, weight, labels, ref_logprobs, ref_hidden, ref_weight, bias,
                         False, seq_kw, S)
    kw = {k: v for k, v in seq_kw.items() if k not in ("segment_ids", "num_segments", "bias")}
    with torch.no_grad():
        return ld_sequence_logprobs(ref_hidden, ref_weight, labels, ld_alpha,
                                    segment_ids=seq_kw["segment_ids"],
                                    num_segments=seq_kw["num_segments"], **kw)[0]


def ld_loss(loss, own, ld_alpha, hidden, weight, labels, seq_kw, ref):
    """LD-DPO (alignkit/losses/ld.py): the policy's desensitised sums on 2S segments, then the
    registry's loss (WPO's weight from the plain sums); the recompute plan."""
    kw = {k: v for k, v in seq_kw.items() if k not in ("segment_ids", "num_segments")}
    note("recompute", "ld_alpha")
    ld, plain, counts = ld_sequence_logprobs(hidden, weight, labels, ld_alpha,
                                             segment_ids=seq_kw["segment_ids"],
                                             num_segments=seq_kw["num_segments"], **kw)
    return paired_loss_on_logps(loss, ld, plain, counts.to(plain.dtype), ref.to(plain.dtype),
                                own)


__all__ = ["ld_segment_ids", "ld_sequence_logprobs", "check_ld", "ld_reference", "ld_loss"]
