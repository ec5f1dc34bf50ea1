"""Calls TRL 1.16's own loss code on given log-probs, through minimal stand-ins for the trainer.

The loss math of TRL's trainers lives inside trainer methods; these helpers run those methods with
an object that carries just the attributes the methods read, so the test compares against TRL's
real code, not a re-typed copy of it.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def trl_dpo(per_token_logps, completion_mask, ref_chosen, ref_rejected, *, beta, loss_types,
            loss_weights=None, label_smoothing=0.0, discopop_tau=0.05,
            f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
            log_sum_sq_probs=None):
    """per_token_logps [2B, L-1] aligned with completion_mask[:, 1:]; returns (loss, metrics).
    log_sum_sq_probs [2B, L-1] (the head's per-token log Σ p²) turns use_weighting (WPO) on."""
    from trl import DPOTrainer
    S, L = completion_mask.shape
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(S, L - 1),
                              mean_logits=torch.zeros(S, L - 1),
                              is_top1=torch.zeros(S, L - 1, dtype=torch.bool),
                              log_sum_sq_probs=log_sum_sq_probs)
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Acc(), ld_alpha=ld_alpha,
        precompute_ref_logps=True, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta,
        label_smoothing=label_smoothing, args=SimpleNamespace(discopop_tau=discopop_tau),
        use_weighting=log_sum_sq_probs is not None, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(S, L, dtype=torch.long), "attention_mask": torch.ones(S, L),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(me, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def trl_cpo(chosen, rejected, *, beta, loss_type, label_smoothing=0.0, simpo_gamma=0.5,
            alpha=0.0):
    """CPOTrainer.cpo_loss (loss_type as CPOConfig leaves it: alphapo becomes simpo there)."""
    from trl.experimental.cpo import CPOTrainer
    me = SimpleNamespace(alpha=alpha, beta=beta, loss_type=loss_type,
                         label_smoothing=label_smoothing,
                         simpo_gamma=simpo_gamma, accelerator=_Acc())
    losses, cr, rr = CPOTrainer.cpo_loss(me, chosen, rejected)
    return losses, cr, rr


def trl_orpo(chosen, rejected, *, beta):
    from trl.experimental.orpo import ORPOTrainer
    me = SimpleNamespace(beta=beta, accelerator=_Acc())
    return ORPOTrainer.odds_ratio_loss(me, chosen, rejected)


def trl_kto(per_token_logps, completion_mask, labels, ref_logps, policy_kl, ref_kl, *, beta,
            desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto"):
    """KTOTrainer._compute_loss on given per-token log-probs [N, L-1]; returns (loss, metrics).
    loss_type="apo_zero_unpaired" turns calculate_KL off, as KTOTrainer does."""
    from trl import KTOTrainer
    N, L = completion_mask.shape
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(N, L - 1),
                              mean_logits=torch.zeros(N, L - 1))
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Acc(),
        calculate_KL=loss_type != "apo_zero_unpaired",
        _compute_kl_logps=lambda model, batch: policy_kl, precompute_ref_logps=True,
        loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    batch = {"input_ids": torch.zeros(N, L, dtype=torch.long), "attention_mask": torch.ones(N, L),
             "completion_mask": completion_mask, "label": labels, "ref_logps": ref_logps,
             "ref_KL_logps": ref_kl}
    loss = KTOTrainer._compute_loss(me, lambda **kw: outputs, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


class _GrpoAcc(_Acc):
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x


def trl_rollout_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """The importance_sampling_ratio TRL 1.16 forms in _generate_and_score_completions (inline
    in that method, so restated here line for line: grpo_trainer.py, 'Compute the importance
    sampling ratio when using vLLM'); [B, T] for token modes, [B, 1] for sequence modes."""
    import math
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)


def trl_grpo(per_token_logps, entropies, completion_mask, advantages, *, loss_type,
             old_per_token_logps=None, ref_per_token_logps=None, beta=0.0,
             importance_sampling_level="token", epsilon=0.2, epsilon_high=None, delta=None,
             entropy_coef=0.0, max_completion_length=None, num_items_in_batch=None,
             use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
             top_entropy_quantile=1.0, off_policy_mask_threshold=None,
             sampling_per_token_logps=None, vllm_importance_sampling_mode=None,
             vllm_importance_sampling_clip_min=None, vllm_importance_sampling_clip_max=3.0,
             vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """GRPOTrainer._compute_loss on given per-token log-probs and entropies [B, T] (its
    _get_per_token_logps_and_entropies answered with them); returns (loss, metrics). With
    vllm_importance_sampling_mode, TRL's vLLM path: use_vllm and the correction on, the ratio
    from trl_rollout_ratio (old_per_token_logps, or the current log-probs on-policy, as TRL
    computes them then)."""
    from trl import GRPOTrainer
    B, T = completion_mask.shape
    args = SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                           sapo_temperature_pos=sapo_temperature_pos,
                           sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos,
                           vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                           vespo_lambda_neg=vespo_lambda_neg)
    vllm = vllm_importance_sampling_mode is not None
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_GrpoAcc(), args=args,
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, entropies, None),
        aux_loss_enabled=False, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        importance_sampling_level=importance_sampling_level, beta=beta, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        use_vllm=vllm, vllm_importance_sampling_correction=vllm,
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length or T,
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, _metrics=defaultdict(lambda: defaultdict(list)))
    args.steps_per_generation = 1
    me.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(me, e, m, t)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long),
              "completion_mask": completion_mask, "advantages": advantages,
              "old_per_token_logps": old_per_token_logps,
              "ref_per_token_logps": ref_per_token_logps,
              "num_items_in_batch": torch.tensor(float(completion_mask.sum()) if
                                                 num_items_in_batch is None else
                                                 float(num_items_in_batch))}
    if sampling_per_token_logps is not None:
        inputs["sampling_per_token_logps"] = sampling_per_token_logps
    if vllm:
        old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        inputs["importance_sampling_ratio"] = trl_rollout_ratio(
            old, sampling_per_token_logps, completion_mask, vllm_importance_sampling_mode,
            vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max)
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def trl_rloo(per_token_logps, entropies, completion_mask, advantages, old_logps, *, epsilon=0.2,
             epsilon_high=None):
    """RLOOTrainer._compute_loss (ratio of summed log-probs) on given per-token log-probs [B, T];
    old_logps [B] (TRL's per-sequence sums); returns (loss, metrics)."""
    from trl import RLOOTrainer
    B, T = completion_mask.shape
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_GrpoAcc(),
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, entropies, None),
        aux_loss_enabled=False, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long),
              "completion_mask": completion_mask, "advantages": advantages, "old_logps": old_logps}
    loss = RLOOTrainer._compute_loss(me, None, inputs)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


# --- TRL's PPOTrainer (trl/experimental/ppo/ppo_trainer.py, upstream; not in TRL 1.16's wheel).
# Restated in its layout: right-padded responses of L_b tokens, `padding_mask` = t > L_b − 1,
# values masked from t > L_b ("padding_mask_p1"). TRL adds the score at index L_b (one past the
# last token, where that index exists); alignkit puts it on the last token (InstructGPT), so the
# rewards check passes TRL rows whose score index is the last token's: TRL's `actual_end` falls
# back to L_b − 1 exactly when L_b == T, and these helpers take that branch for every row.

def _masked_mean(x, m):
    return (x * m).sum() / m.sum()


def _trl_whiten(x, m):
    mean = _masked_mean(x, m)
    var = _masked_mean((x - mean) ** 2, m) * (m.sum() / (m.sum() - 1))    # Bessel, as TRL
    return (x - mean) * torch.rsqrt(var + 1e-8)


def trl_ppo_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator):
    """Step 4 of TRL's rollout: non_score_reward = −kl_coef·kl (k1: −logr, k3: eˡᵒᵍʳ − 1 − logr,
    logr = ref − logprob), the score added at each row's end index, padding zeroed."""
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    end = mask.sum(1) - 1
    rewards[torch.arange(rewards.shape[0]), end] += scores
    return rewards


def trl_ppo_gae(rewards, values, mask, gamma, lam):
    """Step 6: the reversed GAE loop over the response length (next value 0 past the end),
    returns = advantages + values, advantages whitened over the response mask, padding zeroed."""
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    T = rewards.shape[1]
    lastgaelam, out = 0.0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], 1)
    returns = adv + values
    adv = torch.where(mask, _trl_whiten(adv, mask), 0.0)
    return adv, torch.where(mask, returns, 0.0)


def trl_value_loss(vpred, old_values, returns, mask, cliprange_value):
    """The training step's vf_loss: ½·masked_mean(max((V − G)², (clamp(V, old ± c) − G)²))."""
    clipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    return 0.5 * _masked_mean(torch.max((vpred - returns) ** 2, (clipped - returns) ** 2),
                              mask.to(vpred.dtype))


def assert_matches_trl(got, got_m, go, want, want_m, gw, mask):
    """Ours against TRL's own loss (float64): the loss, the gradient of every labelled per-token
    input (log-probs, entropies; a None on TRL's side is a zero on ours) and every metric both
    report (TRL averages its fp32 masks, hence the metrics' looser tolerance)."""
    import pytest
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(go, gw):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a.reshape(mask.shape) * mask, b * mask, rtol=1e-10,
                                       atol=1e-12)
    for k, v in want_m.items():
        if k in got_m:
            assert got_m[k].item() == pytest.approx(v, rel=1e-6, abs=1e-9), k
