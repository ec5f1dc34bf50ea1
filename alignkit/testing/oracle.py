"""The oracle: alignkit's ops and losses in plain PyTorch, on one screen.

Materialises the full [N, V] logits, so it is only for small inputs. Run in float64 it is what
every backend and grad mode is tested against, and what the bench checks before it times; it is
the definition each of them must match. (``alignkit.train.reference`` is the reference *model*
of DPO, a different thing.)
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


def oracle_preference_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, loss: str = "dpo",
                           ref_logprobs: Tensor | None = None, bias: Tensor | None = None,
                           segment_ids: Tensor | None = None, num_segments: int | None = None,
                           average: bool | None = None, ignore_index: int = -100,
                           temperature: float = 1.0, softcap: float | None = None, **own):
    """``alignkit.preference_loss`` from full logits, in the inputs' dtype (give float64): the
    per-sequence log-probs above, then the loss of the registry (alignkit/losses/registry.py) on
    them. Differentiable w.r.t. hidden, weight and bias. Returns (loss, metrics). DPO's
    ``use_weighting=True`` (WPO): log Σ_v p_v² per labelled token from the full logits, summed
    per sequence (``log_sum_sq_probs``), detached."""
    from alignkit.losses.registry import default_average, paired_loss_on_logps
    avg = default_average(loss, own) if average is None else average
    S = num_segments if num_segments is not None or segment_ids is None else \
        int(segment_ids.max()) + 1
    sums, counts = reference_sequence_logprobs(hidden, weight, labels, bias=bias,
                                               segment_ids=segment_ids, num_segments=S,
                                               ignore_index=ignore_index,
                                               temperature=temperature, softcap=softcap)
    counts_f = counts.to(sums.dtype)
    logps = sums / counts_f.clamp(min=1) if avg else sums
    ref = ref_logprobs.detach().to(sums.dtype) if ref_logprobs is not None else None
    if own.get("use_weighting"):
        with torch.no_grad():
            logits = hidden @ weight.t() + (bias if bias is not None else 0)
            z = softcap * torch.tanh(logits / softcap) if softcap is not None else logits
            lp = torch.log_softmax(z / temperature, dim=-1)
            lss = torch.where(labels != ignore_index, torch.logsumexp(2 * lp, dim=-1), 0.0)
            own = {**own, "log_sum_sq_probs": (
                lss.sum(-1) if segment_ids is None else torch.zeros(S, dtype=lss.dtype).index_add_(
                    0, segment_ids.reshape(-1).long(), lss.reshape(-1)))}
    return paired_loss_on_logps(loss, logps, sums, counts_f, ref, own)


def oracle_sft_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                    token_weights: Tensor | None = None, loss_type: str = "nll",
                    num_items=None, temperature: float = 1.0, softcap: float | None = None):
    """``alignkit.sft_loss`` from full logits, in the inputs' dtype (give float64): per token
    ce = (1 − ε)·NLL + ε·mean_v(−log p_v) (F.cross_entropy's smoothing), times sg(p_y) under
    "dft", plus z_loss·lse², times token_weights; summed over labelled tokens and divided by
    their count (or num_items). Returns (loss, {"entropy", "mean_token_accuracy"})."""
    from alignkit.losses.sft import sft_terms
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if bias is not None:
        logits = logits + bias
    z = softcap * torch.tanh(logits / softcap) if softcap is not None else logits
    z = z / temperature
    y = labels.reshape(-1)
    keep = y != ignore_index
    lse = torch.logsumexp(z, -1)
    logp = z - lse[:, None]
    lp = logp.gather(1, torch.where(keep, y, 0).long()[:, None]).squeeze(1)
    ce = sft_terms(lp, lse, z.sum(-1), vocab=weight.shape[0], label_smoothing=label_smoothing,
                   z_loss=z_loss, loss_type=loss_type)
    w = keep.to(z.dtype)
    if token_weights is not None:
        w = w * token_weights.reshape(-1).to(z.dtype)
    n = keep.sum() if num_items is None else torch.as_tensor(num_items)
    n = n.to(z.dtype).clamp(min=1)
    loss = (torch.where(keep, ce, 0.0) * w).sum() / n
    with torch.no_grad():
        cnt = keep.sum().clamp(min=1).to(z.dtype)
        ent = -(logp.exp() * logp).sum(-1)
        top = z.gather(1, torch.where(keep, y, 0).long()[:, None]).squeeze(1) >= z.max(-1).values
        metrics = {"entropy": (ent * keep).sum() / cnt,
                   "mean_token_accuracy": (top & keep).sum().to(z.dtype) / cnt}
    return loss, metrics
def oracle_distill_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                        teacher_weight: Tensor, labels: Tensor, *, beta: float = 1.0,
                        temperature: float = 1.0, student_bias: Tensor | None = None,
                        teacher_bias: Tensor | None = None, ignore_index: int = -100,
                        num_items=None):
    """``alignkit.distill_loss`` from full logits, in the inputs' dtype (give float64), by its
    definition (TRL 1.16's generalized JSD): s, t = log_softmax((h·Wᵀ + b) / temperature) of
    student and teacher; beta = 0: KL(p_t ‖ p_s); beta = 1: KL(p_s ‖ p_t); else
    β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m) with m = (1 − β)·p_s + β·p_t (log m by logaddexp).
    Summed over labelled tokens / their count (or num_items). The teacher is detached; autograd
    gives the student's gradients. Returns (loss, {"entropy": mean student entropy})."""
    def log_probs(h, w, b):
        z = h @ w.t() + (b if b is not None else 0)
        return torch.log_softmax(z / temperature, dim=-1)
    s = log_probs(student_hidden, student_weight, student_bias)
    t = log_probs(teacher_hidden, teacher_weight, teacher_bias).detach()
    if beta == 0:
        d = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        d = (s.exp() * (s - t)).sum(-1)
    else:
        lm = torch.logaddexp(s + torch.log1p(torch.tensor(-beta, dtype=s.dtype)),
                             t + torch.log(torch.tensor(beta, dtype=s.dtype)))
        d = beta * (t.exp() * (t - lm)).sum(-1) + (1 - beta) * (s.exp() * (s - lm)).sum(-1)
    keep = labels != ignore_index
    n = keep.sum().clamp(min=1).to(d.dtype)
    denom = n if num_items is None else torch.as_tensor(num_items, dtype=d.dtype)
    ent = -(s.exp() * s).sum(-1)
    return (torch.where(keep, d, 0.0).sum() / denom,
            {"entropy": (torch.where(keep, ent, 0.0).sum() / n).detach()})
