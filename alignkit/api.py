"""Public functional API and thin nn.Modules over alignkit.ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from alignkit.ops.linear_logprobs import linear_logprobs
from alignkit.ops.logits_logprobs import logits_logprobs
from alignkit.ops.options import LogprobArgs, TileOptions
from alignkit.ops.validate import sequence_layout


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor] = None, ignore_index: int = -100,
                          temperature: float = 1.0, softcap: Optional[float] = None,
                          return_entropy: bool = False, backend: str = "auto",
                          tiles: Optional[TileOptions] = None):
    """Per-token log p(label | hidden) through the LM head, never forming [N, V] logits.

    z = softcap·tanh((h·Wᵀ + b)/softcap) / temperature   (softcap optional)
    logp = z[label] − logsumexp(z),   entropy = −Σ_v p_v log p_v over the full vocabulary.

    Args:
        hidden: [..., H] float (fp32, bf16, fp16; computed with fp32 accumulation).
        weight: [V, H] LM-head weight. bias: optional [V].
        labels: [...] integer, aligned with hidden: label i is the token predicted from hidden i.
            Values in [0, V) or ignore_index.
        backend: "auto" (C++ kernels on CPU when built, else torch), "torch", "cpp", "triton".
        tiles: alignkit.TileOptions, the memory and schedule knobs (tile budget, vocab block,
            ...); None: their defaults (environment variables, else built-in).

    Returns:
        float32 logprobs with the shape of labels (exactly 0.0 where label == ignore_index), or
        (logprobs, entropy) with return_entropy=True (entropy is 0.0 at ignored positions).
        Differentiable w.r.t. hidden, weight and bias.

    Non-finite values in hidden or weight are not checked (that would cost a pass and a sync); they
    follow IEEE arithmetic to the tokens they reach: NaN in a hidden row makes that token's outputs
    NaN, NaN in weight makes every labelled token's NaN, a logit of +inf gives NaN and a logit of
    -inf a probability of exactly 0. Ignored positions never touch W and stay 0.0.
    """
    opts = LogprobArgs(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                          return_entropy=return_entropy, backend=backend,
                          tiles=tiles or TileOptions())
    lp, ent = linear_logprobs(hidden, weight, labels, bias=bias, opts=opts)
    return (lp, ent) if return_entropy else lp


def token_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, return_entropy: bool = False,
                   backend: str = "auto", tiles: Optional[TileOptions] = None):
    """Per-token log p(label | logits) from given logits [..., V], chunked over rows.

    Same semantics and return values as linear_token_logprobs. The forward makes no second
    [N, V] fp32 tensor; the backward writes one [N, V] gradient in the logits' dtype.
    """
    opts = LogprobArgs(ignore_index=ignore_index, temperature=temperature,
                          return_entropy=return_entropy, backend=backend,
                          tiles=tiles or TileOptions())
    lp, ent = logits_logprobs(logits, labels, opts=opts)
    return (lp, ent) if return_entropy else lp


def reduce_sequences(token_lp: Tensor, labels: Tensor, *, segment_ids: Optional[Tensor] = None,
                     num_segments: Optional[int] = None, average: bool = False,
                     ignore_index: int = -100):
    """Sums (or means) per-token log-probs per sequence. See sequence_logprobs for the layouts."""
    seg, num_segments = sequence_layout(labels, segment_ids, num_segments,
                                        who="reduce_sequences")
    return _reduce(token_lp, labels, seg, num_segments, average, ignore_index)


def _reduce(token_lp, labels, seg, num_segments, average, ignore_index):
    keep = labels != ignore_index
    if seg is None:
        sums = token_lp.flatten(1).sum(1)
        counts = keep.flatten(1).sum(1)
    else:
        sums = token_lp.new_zeros(num_segments).index_add(0, seg, token_lp.reshape(-1))
        counts = torch.zeros(num_segments, dtype=torch.long, device=seg.device).index_add_(
            0, seg, keep.reshape(-1).long())
    if average:
        sums = sums / counts.clamp(min=1).to(sums.dtype)
    return sums, counts


def sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                      segment_ids: Optional[Tensor] = None, average: bool = False,
                      num_segments: Optional[int] = None, bias: Optional[Tensor] = None,
                      ignore_index: int = -100, temperature: float = 1.0,
                      softcap: Optional[float] = None, backend: str = "auto",
                      tiles: Optional[TileOptions] = None):
    """Per-sequence Σ_t log p(label_t | hidden_t), or the mean over labelled tokens (average=True).

    Layouts:
        padded  hidden [S, T, H], labels [S, T]               -> one value per row
        packed  hidden [N, H], labels [N], segment_ids [N]    -> one value per segment id in
                [0, num_segments) (default: max id + 1, which costs one sync, and must not
                exceed N: pass num_segments for sparse ids)

    Returns:
        (values, token_counts): values float32 [S]; token_counts int64 [S], the labelled tokens of
        each sequence. A sequence with no labelled token gets value 0.0 (sum and mean alike).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    seg, num_segments = sequence_layout(labels, segment_ids, num_segments,
                                        who="sequence_logprobs", hidden=hidden)
    lp = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                               temperature=temperature, softcap=softcap, backend=backend,
                               tiles=tiles)
    return _reduce(lp, labels, seg, num_segments, average, ignore_index)


class LinearTokenLogprobs(nn.Module):
    """Module form of linear_token_logprobs: options in the constructor, tensors in forward."""

    def __init__(self, *, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: Optional[float] = None, return_entropy: bool = False,
                 backend: str = "auto", tiles: Optional[TileOptions] = None):
        super().__init__()
        self.opts = LogprobArgs(ignore_index=ignore_index, temperature=temperature,
                                   softcap=softcap, return_entropy=return_entropy, backend=backend,
                                   tiles=tiles or TileOptions())

    def forward(self, hidden, weight, labels, *, bias=None):
        lp, ent = linear_logprobs(hidden, weight, labels, bias=bias, opts=self.opts)
        return (lp, ent) if self.opts.return_entropy else lp
