"""Off-policy corrections and token selections of the policy losses (alignkit.losses.policy),
as TRL 1.16's GRPOTrainer applies them (trl/trainer/grpo_trainer.py, _compute_loss and
_generate_and_score_completions). Per labelled token t of sequence s, with lp = log π(y_t),
old = log π_old(y_t) (lp.detach() on-policy), q = the sampler's log-prob (rollout_logprobs,
TRL's sampling_per_token_logps), A the advantage, Σ_s a sum over s's labelled tokens:

rollout_correction (TRL: vllm_importance_sampling_correction + vllm_importance_sampling_mode,
rollout_correction_min / _max = vllm_importance_sampling_clip_min / _max; Yao et al. 2025,
"Your efficient RL framework secretly brings you off-policy RL training"):
    r_t = exp(old_t − q_t) (token_*),  r_s = exp(Σ_s (old − q)) for every t of s (sequence_*)
    *_truncate: r ← clamp(r, C_min, C_max);   *_mask: r ← r·[C_min ≤ r ≤ C_max]
    the policy term of every token is multiplied by r (not the KL term; vespo folds r into its
    weight instead, token modes only, as TRL requires). Tokens where q is NaN get r = 1.
off_policy_mask_threshold δ (off-policy sequence masking, DeepSeek-V3.2, arXiv:2512.02556):
    keep s's policy terms iff A ≥ 0 or (1/|s|)·Σ_s (q' − sg(lp)) ≤ δ, q' = q if given, else old
top_entropy_quantile ρ (Wang et al. 2025, "Beyond the 80/20 rule", arXiv:2506.01939):
    keep token t's policy term iff H_t ≥ quantile_{labelled tokens}(H, 1 − ρ) (H detached); the
    entropy bonus then averages over the kept tokens only, as TRL's effective mask
vespo (Variational Sequence-level Soft Policy Optimisation, TRL's get_gamma_weights):
    log w_s = clamp(Σ_s clamp(lp − old, ±20) + Σ_s log r_t, log 1e-8, 20),
    φ_s = exp(λ + k·log w_s − λ·w_s)  (k, λ = vespo_k_pos, vespo_lambda_pos if A ≥ 0, else the
    _neg pair; φ(1) = 1),  ℓ_t = −sg(φ_s)·A·lp_t, normalised as dapo (Σ ℓ / num_items)
sequence_sum importance sampling (TRL's RLOOTrainer): w_s = Σ_s (lp − old), ρ_s = exp(w_s),
    with grpo's per-sequence mean that is RLOO's −(1/S)·Σ_s min(ρ_s·A_s, clip(ρ_s)·A_s).

Cost on the single pass (alignkit.ops.token_pass, coupled=True): a token's coefficient that
needs quantities of the whole sequence or batch under the current policy (vespo's w_s, the
off-policy mask's mean KL, the entropy quantile, an on-policy rollout ratio, sequence-level
ratios) is known only once every token is scored; such tokens are formed with a unit
coefficient and kept (3 GEMMs within tiles.keep_bytes, 4 past it), and an entropy bonus beside
them is refused there (the recompute serves it: 4 GEMMs). A rollout correction with
old_logprobs given is known before the pass and keeps the 3-GEMM token pass.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from alignkit.losses.options import check_number

ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_LOG_MIN = math.log(1e-8)


def correction_options(o: dict, *, rollout_given: bool, rollout_correction, rc_min, rc_max,
                       off_policy_mask_threshold, top_entropy_quantile, vespo) -> dict:
    """Validates the corrections (naming each argument) and returns them as option entries."""
    if rollout_correction is not None and rollout_correction not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout_correction must be None or one of "
                         f"{', '.join(ROLLOUT_CORRECTIONS)}; got {rollout_correction!r}")
    if rollout_correction is not None and not rollout_given:
        raise ValueError("rollout_correction needs rollout_logprobs (the sampler's per-token "
                         "log-probs, the labels' shape)")
    for name, v in (("rollout_correction_min", rc_min), ("rollout_correction_max", rc_max)):
        if v is not None:
            check_number(name, v, low=0)
    if rc_min is not None and rc_max is not None and rc_min > rc_max:
        raise ValueError(f"rollout_correction_min ({rc_min}) must be <= rollout_correction_max "
                         f"({rc_max})")
    if off_policy_mask_threshold is not None:
        check_number("off_policy_mask_threshold", off_policy_mask_threshold)
    check_number("top_entropy_quantile", top_entropy_quantile, low=0, high=1)
    if rollout_given and rollout_correction is None and off_policy_mask_threshold is None:
        raise ValueError("rollout_logprobs is read only with rollout_correction= or "
                         "off_policy_mask_threshold=; it would be ignored, so it is refused")
    names = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
    for name, v in zip(names, vespo):
        check_number(name, v)
    if o["loss_type"] == "vespo":
        if o["level"] != "token":
            raise ValueError("vespo forms its sequence weight itself: it needs "
                             "importance_sampling_level='token' (as TRL requires)")
        if rollout_correction not in (None, "token_truncate", "token_mask"):
            raise ValueError("vespo takes rollout_correction 'token_truncate' or 'token_mask' "
                             f"(as TRL requires); got {rollout_correction!r}")
    elif any(v != d for v, d in zip(vespo, (2.0, 3.0, 3.0, 2.0))):
        raise ValueError(f"vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg apply "
                         f"to loss_type='vespo', not {o['loss_type']!r}")
    return dict(rc=rollout_correction, rc_min=rc_min, rc_max=rc_max,
                opm=None if off_policy_mask_threshold is None else float(off_policy_mask_threshold),
                teq=float(top_entropy_quantile), vespo=tuple(float(v) for v in vespo))


def coupling_reason(o: dict, has_old: bool):
    """Why a token's gradient coefficient is known only once every token is scored (the single
    pass's coupled mode), or None."""
    if o["level"] != "token":
        return "sequence-level importance sampling"
    if o["loss_type"] == "vespo":
        return "vespo (its weight takes the sequence's summed ratio)"
    if o["opm"] is not None:
        return "off_policy_mask_threshold (the sequence's mean KL under the current policy)"
    if o["teq"] < 1:
        return "top_entropy_quantile (the quantile of every token's entropy)"
    if o["rc"] is not None and not has_old:
        return "rollout_correction on-policy (its ratio reads the current log-probs)"
    return None


def seq_sum(x: Tensor, seg: Tensor, S: int) -> Tensor:
    return torch.zeros(S, device=x.device, dtype=x.dtype).index_add(0, seg, x)


@torch.no_grad()
def rollout_ratio(old: Tensor, rollout: Tensor, keep: Tensor, seg: Tensor, S: int, o) -> Tensor:
    """TRL's importance_sampling_ratio, per token [N] (sequence modes: s's value on each of its
    tokens); detached. keep: the label mask as floats."""
    d = torch.nan_to_num((old - rollout) * keep, nan=0.0)
    if o["rc"].startswith("sequence"):
        d = seq_sum(d, seg, S).index_select(0, seg)
    r = torch.exp(d)
    lo = -math.inf if o["rc_min"] is None else o["rc_min"]
    hi = math.inf if o["rc_max"] is None else o["rc_max"]
    if o["rc"].endswith("truncate"):
        return torch.clamp(r, min=o["rc_min"], max=o["rc_max"])
    return r.masked_fill((r < lo) | (r > hi), 0.0)


@torch.no_grad()
def vespo_phi(lp: Tensor, old: Tensor, ratio, adv: Tensor, keep: Tensor, seg: Tensor, S: int,
              o) -> Tensor:
    """φ_s on each token of s [N] (TRL's get_gamma_weights); ratio: the token-mode rollout ratio
    [N] or None."""
    log_w = seq_sum(torch.clamp(lp - old, -20.0, 20.0) * keep, seg, S)
    if ratio is not None:
        log_w = log_w + seq_sum(torch.clamp(torch.log(ratio), _LOG_MIN, 20.0) * keep, seg, S)
    log_w = torch.clamp(log_w, _LOG_MIN, 20.0).index_select(0, seg)
    k_pos, l_pos, k_neg, l_neg = o["vespo"]
    pos = adv >= 0
    k = torch.where(pos, k_pos, k_neg).to(lp.dtype)
    lam = torch.where(pos, l_pos, l_neg).to(lp.dtype).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def off_policy_keep(lp: Tensor, sampling: Tensor, adv: Tensor, keep: Tensor, seg: Tensor,
                    S: int, threshold: float) -> Tensor:
    """1 where t's sequence is kept (A ≥ 0 or its mean KL ≤ threshold), else 0 [N]."""
    kl = torch.nan_to_num(sampling - lp, nan=0.0) * keep
    counts = seq_sum(keep, seg, S).clamp(min=1)
    mean_kl = (seq_sum(kl, seg, S) / counts).index_select(0, seg)
    return ((adv >= 0) | (mean_kl <= threshold)).to(lp.dtype)


@torch.no_grad()
def entropy_keep(ent: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """1 where H_t ≥ the (1 − quantile) quantile of the labelled tokens' entropies [N]."""
    sel = ent[mask].float()
    if sel.numel() == 0:
        return torch.zeros_like(ent)
    thr = torch.quantile(sel, 1 - quantile).to(ent.dtype)
    return ((ent >= thr) & mask).to(ent.dtype)


__all__ = ["ROLLOUT_CORRECTIONS", "correction_options", "coupling_reason", "rollout_ratio",
           "vespo_phi", "off_policy_keep", "entropy_keep"]
