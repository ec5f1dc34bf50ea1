"""Every loss-shaping option of TRL 1.16's GRPOConfig, RLOOConfig, DPOConfig, KTOConfig, CPOConfig
and ORPOConfig, and what alignkit does with it: in its standalone losses (policy_loss,
preference_loss / logprob_loss, kto_loss, cpo_loss, ...) and in the drop-in
(alignkit.patch_trainer, where TRL's own loss code runs on alignkit's LM head).

Status words: ``supported`` (the alignkit name follows), ``refused`` (raises at the call, naming
the option and the reason below), ``caller`` (not an argument of a loss: what the caller does
instead). The "TRL options" table of docs/dropins.md is ``render()`` of this list, and
tests/test_trl_options_table.py checks it against the installed TRL's config fields (every field
is here or in NOT_LOSS_SHAPING) and against docs/dropins.md.
"""
from __future__ import annotations

from typing import NamedTuple, Optional


class Option(NamedTuple):
    configs: tuple      # TRL config classes that have the field ("GRPO" for GRPOConfig, ...)
    name: str           # the field's name in TRL
    standalone: str     # "supported: `alignkit name`" | "refused" | "caller"
    dropin: str         # "supported" | "refused"
    why: str            # how (supported), the reason (refused), or what to do (caller)


_TRL_CODE = "supported"       # the drop-in: TRL's own loss code reads it
_ADV = "advantages are an input of policy_loss: shape them before the call"

OPTIONS = (
    # ------------------------------------------------------------ GRPO / RLOO (policy_loss)
    Option(("GRPO",), "loss_type", "supported: `loss_type`", _TRL_CODE,
           "grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo (+ ppo)"),
    Option(("GRPO", "RLOO"), "epsilon", "supported: `epsilon_low`", _TRL_CODE, ""),
    Option(("GRPO", "RLOO"), "epsilon_high", "supported: `epsilon_high`", _TRL_CODE, ""),
    Option(("GRPO",), "delta", "supported: `delta`", _TRL_CODE, "two-sided clip"),
    Option(("GRPO",), "beta", "supported: `beta`", _TRL_CODE, "KL term in the loss (k3)"),
    Option(("RLOO",), "beta", "caller", _TRL_CODE,
           "RLOO puts β·KL in the reward: subtract β·Σ_t (log π − log π_ref) from each "
           "sequence's reward before the advantages"),
    Option(("GRPO",), "importance_sampling_level", "supported: `importance_sampling_level`",
           _TRL_CODE, "token, sequence; RLOO's summed ratio is `sequence_sum`"),
    Option(("GRPO",), "sapo_temperature_pos", "supported: `sapo_temperature_pos`", _TRL_CODE, ""),
    Option(("GRPO",), "sapo_temperature_neg", "supported: `sapo_temperature_neg`", _TRL_CODE, ""),
    Option(("GRPO",), "vespo_k_pos", "supported: `vespo_k_pos`", _TRL_CODE, ""),
    Option(("GRPO",), "vespo_lambda_pos", "supported: `vespo_lambda_pos`", _TRL_CODE, ""),
    Option(("GRPO",), "vespo_k_neg", "supported: `vespo_k_neg`", _TRL_CODE, ""),
    Option(("GRPO",), "vespo_lambda_neg", "supported: `vespo_lambda_neg`", _TRL_CODE, ""),
    Option(("GRPO",), "top_entropy_quantile", "supported: `top_entropy_quantile`", _TRL_CODE, ""),
    Option(("GRPO",), "entropy_coef", "supported: `entropy_coef`", _TRL_CODE, ""),
    Option(("GRPO",), "use_adaptive_entropy", "caller", _TRL_CODE,
           "a per-step controller of entropy_coef: pass the current value as `entropy_coef`"),
    Option(("GRPO",), "entropy_coef_min", "caller", _TRL_CODE, "as use_adaptive_entropy"),
    Option(("GRPO",), "entropy_coef_max", "caller", _TRL_CODE, "as use_adaptive_entropy"),
    Option(("GRPO",), "entropy_coef_delta", "caller", _TRL_CODE, "as use_adaptive_entropy"),
    Option(("GRPO",), "entropy_target", "caller", _TRL_CODE, "as use_adaptive_entropy"),
    Option(("GRPO",), "vllm_importance_sampling_correction",
           "supported: `rollout_logprobs` + `rollout_correction`", _TRL_CODE, ""),
    Option(("GRPO",), "vllm_importance_sampling_mode", "supported: `rollout_correction`",
           _TRL_CODE, "token_truncate, token_mask, sequence_truncate, sequence_mask"),
    Option(("GRPO",), "vllm_importance_sampling_clip_min", "supported: `rollout_correction_min`",
           _TRL_CODE, ""),
    Option(("GRPO",), "vllm_importance_sampling_clip_max", "supported: `rollout_correction_max`",
           _TRL_CODE, ""),
    Option(("GRPO",), "vllm_importance_sampling_cap", "supported: `rollout_correction_max`",
           _TRL_CODE, "TRL's deprecated name of clip_max"),
    Option(("GRPO",), "off_policy_mask_threshold", "supported: `off_policy_mask_threshold`",
           _TRL_CODE, ""),
    Option(("GRPO",), "use_bias_correction_kl", "supported: `kl_importance_weight`", _TRL_CODE,
           "default True, as TRL"),
    Option(("GRPO",), "max_completion_length", "supported: `max_completion_length`", _TRL_CODE,
           "dr_grpo's normaliser"),
    Option(("GRPO", "RLOO"), "temperature", "supported: `temperature`", _TRL_CODE,
           "the log-probs' temperature"),
    Option(("GRPO",), "cast_lm_head_to_fp32", "caller", _TRL_CODE,
           "pass fp32 hidden and weight outside autocast; the drop-in runs the head in fp32"),
    Option(("GRPO", "RLOO"), "num_iterations", "caller", _TRL_CODE,
           "pass `old_logprobs` (None: on-policy, ratio 1)"),
    Option(("GRPO", "RLOO"), "mask_truncated_completions", "caller", _TRL_CODE,
           "set the truncated completions' labels to ignore_index"),
    Option(("GRPO", "RLOO"), "num_generations", "caller", _TRL_CODE, _ADV),
    Option(("GRPO", "RLOO"), "reward_weights", "caller", _TRL_CODE, _ADV),
    Option(("GRPO",), "scale_rewards", "caller", _TRL_CODE, _ADV),
    Option(("GRPO",), "multi_objective_aggregation", "caller", _TRL_CODE, _ADV),
    Option(("RLOO",), "normalize_advantages", "caller", _TRL_CODE, _ADV),
    Option(("RLOO",), "reward_clip_range", "caller", _TRL_CODE, _ADV),
    # --------------------------------------------------------------- DPO (preference_loss)
    Option(("DPO",), "loss_type", "supported: `loss_type`", _TRL_CODE,
           "TRL's 15 types (+ `cdpo`); a list sums with loss_weights"),
    Option(("DPO",), "loss_weights", "supported: `loss_weights`", _TRL_CODE, ""),
    Option(("DPO", "KTO", "CPO", "ORPO"), "beta", "supported: `beta`", _TRL_CODE, ""),
    Option(("DPO",), "label_smoothing", "supported: `label_smoothing`", _TRL_CODE,
           "as TRL 1.16: `sigmoid` ignores it (raises if nothing reads it); cDPO is `cdpo`"),
    Option(("DPO",), "discopop_tau", "supported: `discopop_tau`", _TRL_CODE, ""),
    Option(("DPO",), "f_divergence_type", "supported: `f_divergence_type`", _TRL_CODE,
           "reverse_kl, forward_kl, js_divergence, alpha_divergence"),
    Option(("DPO",), "f_alpha_divergence_coef", "supported: `f_alpha_divergence_coef`",
           _TRL_CODE, ""),
    Option(("DPO",), "use_weighting", "supported: `use_weighting`", _TRL_CODE,
           "WPO: one extra forward GEMM (log Σp²); not with aot, aot_unpaired, sft"),
    Option(("DPO",), "ld_alpha", "supported: `ld_alpha`", _TRL_CODE,
           "preference_loss, recompute plan (2S segments); refused by logprob_loss (sums), the "
           "trainer (plain cached reference) and with sft"),
    Option(("DPO", "KTO"), "precompute_ref_log_probs", "caller", _TRL_CODE,
           "pass `ref_logprobs` (or `ref_hidden` + `ref_weight`)"),
    # ------------------------------------------------------------------------ KTO (kto_loss)
    Option(("KTO",), "loss_type", "supported: `loss_type`", _TRL_CODE, "kto, apo_zero_unpaired"),
    Option(("KTO",), "desirable_weight", "supported: `desirable_weight`", _TRL_CODE, ""),
    Option(("KTO",), "undesirable_weight", "supported: `undesirable_weight`", _TRL_CODE, ""),
    # ------------------------------------------------------------- CPO (cpo_loss, loss="cpo")
    Option(("CPO",), "loss_type", "supported: `loss_type`", _TRL_CODE,
           "sigmoid, hinge (sums), ipo, simpo, alphapo (averages)"),
    Option(("CPO",), "label_smoothing", "supported: `label_smoothing`", _TRL_CODE, ""),
    Option(("CPO",), "cpo_alpha", "supported: `cpo_alpha`", _TRL_CODE, "the NLL weight"),
    Option(("CPO",), "simpo_gamma", "supported: `simpo_gamma`", _TRL_CODE, ""),
    Option(("CPO",), "alpha", "supported: `alpha`", _TRL_CODE, "AlphaPO's reward shape"),
    # ----------------------------------------------------------------------------- every one
    Option(("GRPO", "RLOO", "DPO", "KTO"), "router_aux_loss_coef", "caller", "refused",
           "MoE aux loss: add the model's own (standalone); the drop-in refuses router logits "
           "when patching"),
)

# The other fields of those configs (beyond transformers.TrainingArguments'): they shape the
# data, the generation, the models or the logs, not the loss. A test keeps this exact.
NOT_LOSS_SHAPING = {
    "data": ("dataset_num_proc", "max_length", "truncation_mode", "padding_free",
             "pad_to_multiple_of", "pad_token", "padding_value", "shuffle_dataset",
             "max_completion_length", "is_encoder_decoder", "precompute_ref_batch_size"),
    "generation": ("num_generations_eval", "generation_batch_size", "steps_per_generation",
                   "top_p", "top_k", "min_p", "generation_kwargs", "chat_template_kwargs",
                   "repetition_penalty", "cache_implementation", "max_tool_calling_iterations",
                   "generate_during_eval", "ds3_gather_for_generation", "use_vllm", "vllm_mode",
                   "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
                   "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                   "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
                   "vllm_max_model_length", "vllm_tensor_parallel_size",
                   "use_transformers_continuous_batching",
                   "transformers_continuous_batching_config", "use_transformers_paged"),
    "models": ("model_init_kwargs", "trust_remote_code", "disable_dropout",
               "activation_offloading", "sync_ref_model", "ref_model_mixup_alpha",
               "ref_model_sync_steps"),
    "logs": ("log_completions", "log_multimodal", "num_completions_to_print",
             "log_unique_prompts", "log_completions_hub_repo"),
}

_LOSS_CONFIG = {"dpo": "DPO", "cpo": "CPO", "orpo": "ORPO", "kto": "KTO", "simpo": "CPO"}


def refusal(loss: str, name: str) -> Optional[str]:
    """The reason alignkit's standalone ``loss`` refuses TRL's option ``name``, or None."""
    cfg = _LOSS_CONFIG.get(loss)
    for o in OPTIONS:
        if o.name == name and cfg in o.configs and o.standalone == "refused":
            return o.why
    return None


def _cell(s: str) -> str:
    return s.replace("supported: ", "✅ ", 1).replace("supported", "✅", 1) \
        if s.startswith("supported") else \
        {"refused": "❌ refused", "caller": "➖ caller"}[s]


def render() -> str:
    """The docs' table (markdown), one row per option (configs sharing a treatment share
    the row)."""
    lines = ["| TRL option | configs | standalone | drop-in | notes |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        lines.append(f"| `{o.name}` | {', '.join(o.configs)} | {_cell(o.standalone)} | "
                     f"{_cell(o.dropin)} | {o.why} |")
    return "\n".join(lines)


__all__ = ["OPTIONS", "NOT_LOSS_SHAPING", "Option", "refusal", "render"]
