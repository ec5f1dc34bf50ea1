"""Pure-PyTorch reference: the semantics of alignkit's ops on one screen.

Materialises the full [N, V] logits, so it is only for small inputs: it is the test oracle's twin
(run it in float64), the baseline of bench/ and the definition every backend must match.
"""
from __future__ import annotations

import torch
from torch import Tensor


def reference_token_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                             temperature: float = 1.0, softcap: float | None = None,
                             return_entropy: bool = False):
    """log p(label | logits) in the logits' dtype promoted to at least fp32.

    z = softcap·tanh(logits/softcap) / temperature;  logp = z[label] − logsumexp(z);
    entropy = −Σ p log p. Positions with label == ignore_index give exactly 0.0 (both outputs).
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, 0).long()
    lp = torch.where(keep, logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return lp
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, torch.where(keep, ent, 0.0)


def reference_linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                                    bias: Tensor | None = None, **kw):
    """The same through the LM head: logits = hidden @ weightᵀ + bias."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return reference_token_logprobs(logits, labels, **kw)


def reference_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                                segment_ids: Tensor | None = None, num_segments: int | None = None,
                                average: bool = False, ignore_index: int = -100, **kw):
    """Per-sequence Σ (or mean, with average=True) of token log-probs over labelled tokens.

    Padded [S, T, H] -> [S]; packed [N, H] with segment_ids [N] -> [num_segments].
    Returns (values, token_counts); a sequence with no labelled token has value 0.0, count 0.
    """
    lp = reference_linear_token_logprobs(hidden, weight, labels, ignore_index=ignore_index, **kw)
    keep = (labels != ignore_index).to(lp.dtype)
    if segment_ids is None:
        sums, counts = lp.sum(-1), keep.sum(-1)
    else:
        S = int(segment_ids.max()) + 1 if num_segments is None else num_segments
        seg = segment_ids.reshape(-1).long()
        sums = torch.zeros(S, dtype=lp.dtype).index_add_(0, seg, lp.reshape(-1))
        counts = torch.zeros(S, dtype=lp.dtype).index_add_(0, seg, keep.reshape(-1))
    if average:
        sums = sums / counts.clamp(min=1)
    return sums, counts.long()
