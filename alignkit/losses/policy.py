"""RL policy losses from hidden states: PPO and the GRPO family, with a KL penalty to a reference
and an entropy bonus, on the fused head (no [tokens x vocab] logits).

Per labelled token t of sequence s (lp = log π(y_t), old = log π_old(y_t), ref = log π_ref(y_t),
A the advantage of s or of t, ε_l = epsilon_low, ε_h = epsilon_high):
    w_t = lp − old (token), or w_s = Σ_{t∈s}(lp − old)/|s| for every t of s (sequence: GSPO,
          Zheng et al. 2025, arXiv:2507.18071);  ρ = exp(w)
    grpo, bnpo, dr_grpo, dapo, luspo, ppo:  ℓ = −min(ρ'·A, clip(ρ, 1−ε_l, 1+ε_h)·A)
          (ρ' = min(ρ, delta) with delta, two-sided clipping; PPO: Schulman et al. 2017,
          arXiv:1707.06347; GRPO: Shao et al. 2024, arXiv:2402.03300)
    (importance_sampling_level="sequence_sum": w_s = Σ_{t∈s}(lp − old), TRL's RLOOTrainer;
          RLOO = loss_type="grpo" with it, Ahmadian et al. 2024, arXiv:2402.14740)
    cispo: ℓ = −sg(min(ρ, ε_h))·A·lp          (MiniMax-M1, arXiv:2506.13585; ε_h caps ρ)
    vespo: ℓ = −sg(φ_s)·A·lp, φ the gamma weight of s's summed ratio (policy_corrections)
    sapo:  ℓ = −σ(τ(ρ − 1))·4/τ·A, τ = τ₊ if A > 0 else τ₋
          (Soft Adaptive Policy Optimization, arXiv:2511.20347)
    KL (beta > 0), with d = ref − lp:  k1 = −d,  k2 = d²/2,  k3 = eᵈ − d − 1   (Schulman 2020,
          "Approximating KL divergence"); ℓ += β·k (·ρ with kl_importance_weight, TRL's
          use_bias_correction_kl, on by default as in TRL)
Before the KL term is added, the policy term is multiplied by the rollout correction, the
off-policy sequence mask and the entropy-quantile mask (alignkit.losses.policy_corrections).
The per-token terms are then normalised (|s| labelled tokens of s, S sequences, N = Σ|s|):
    grpo, sapo   (1/S)·Σ_s (1/|s|)·Σ_t ℓ        bnpo, ppo    (1/N)·Σ ℓ
    dr_grpo      Σ ℓ / (S·max_completion_length)   (Liu et al. 2025, arXiv:2503.20783)
    dapo, cispo, vespo  Σ ℓ / num_items (default N; pass the count of the accumulation window)
                 (DAPO, Yu et al. 2025, arXiv:2503.14476)
    luspo        (1/S)·Σ_s Σ_t ℓ                (LUSPO, arXiv:2602.05261)
and the entropy bonus is −entropy_coef·(1/N)·Σ H_t, with H the entropy of the full distribution
and its true gradient through the softmax (over the kept tokens under top_entropy_quantile).

These are TRL 1.16 GRPOTrainer._compute_loss's terms and normalisations (tests/test_policy.py
checks them against it); ppo and the k1/k2 estimators are alignkit's additions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.api import linear_token_logprobs
from alignkit.losses.options import check_number
from alignkit.losses.policy_corrections import correction_options, coupling_reason, rollout_ratio
from alignkit.losses.policy_terms import KL_ESTIMATORS, kl_estimate, policy_terms, token_terms
from alignkit.ops.backends import autocast_head, resolve
from alignkit.ops.options import LogprobArgs, TileOptions
from alignkit.ops.pass_budget import (NO_GRAD, effective_mode, keep_rows, pass_blocker,
                                      pinned_plan, tile_rows)
from alignkit.ops.plan import candidates, choose_and_run, note, plan_key
from alignkit.ops.token_pass import TokenPassSpec, token_pass_loss
from alignkit.ops.validate import check_linear_inputs, sequence_layout

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "ppo", "vespo")
IS_LEVELS = ("token", "sequence", "sequence_sum")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "ppo")


@autocast_head
def policy_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, advantages: Tensor,
                old_logprobs: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None,
                segment_ids: Optional[Tensor] = None, loss_type: str = "dapo",
                importance_sampling_level: str = "token", epsilon_low: float = 0.2,
                epsilon_high: Optional[float] = None, delta: Optional[float] = None,
                beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                max_completion_length: Optional[int] = None, bias: Optional[Tensor] = None,
                ignore_index: int = -100, temperature: float = 1.0,
                softcap: Optional[float] = None, num_items: Optional[Tensor | int] = None,
                sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                kl_importance_weight: bool = True, backend: str = "auto",
                grad_mode: str = "auto", tiles=None, rollout_logprobs: Optional[Tensor] = None,
                rollout_correction: Optional[str] = None,
                rollout_correction_min: Optional[float] = None,
                rollout_correction_max: Optional[float] = 3.0,
                off_policy_mask_threshold: Optional[float] = None,
                top_entropy_quantile: float = 1.0, vespo_k_pos: float = 2.0,
                vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                vespo_lambda_neg: float = 2.0):
    """A policy-gradient loss of completions, from hidden states (formulas: module docstring).

    Shapes: padded hidden [S, T, H] and labels [S, T], or packed hidden [N, H], labels [N] and
    segment_ids [N] in [0, S). Labels are aligned with hidden (label i scored from hidden i);
    ignore_index marks prompt and padding. advantages: [S], or per token (the labels' shape).
    old_logprobs / ref_logprobs: per token, the labels' shape (ignored positions are not read);
    old_logprobs=None is on-policy (the detached current log-probs). epsilon_high=None means
    epsilon_low (cispo: the cap on the ratio). num_items: the labelled-token count dapo and cispo
    divide by (default: this batch's). kl_importance_weight: the KL term times ρ (TRL's
    use_bias_correction_kl; default True, as TRL).

    Corrections (formulas: alignkit.losses.policy_corrections), keyword-only:
    rollout_logprobs (per token, the labels' shape: the sampler's log-probs, TRL's
    sampling_per_token_logps) with rollout_correction in "token_truncate", "token_mask",
    "sequence_truncate", "sequence_mask" (TRL's vllm_importance_sampling_mode) and its bounds
    rollout_correction_min (default None) / rollout_correction_max (default 3.0) (TRL's
    vllm_importance_sampling_clip_min / _clip_max); off_policy_mask_threshold (TRL's, None = off;
    it reads rollout_logprobs if given, else old_logprobs); top_entropy_quantile (TRL's, in
    [0, 1], 1 = off); vespo_k_pos (2.0), vespo_lambda_pos (3.0), vespo_k_neg (3.0),
    vespo_lambda_neg (2.0) for loss_type="vespo" (TRL's names and defaults).

    Returns (loss, metrics): 0-dim loss; metrics 0-dim detached tensors with TRL's keys:
    ``entropy``, ``kl`` (beta > 0), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max`` (clipped types),
    ``cispo_clip_ratio`` (cispo). Differentiable w.r.t. hidden, weight and bias.

    grad_mode: "single_pass" (G is formed in the forward pass from full-vocabulary tiles.
    Token-level importance sampling: each token's gradient coefficient is known once its row is
    scored, entropy term included: 3 GEMMs for any number of sequences. Sequence-level: a
    token's coefficient needs its sequence's mean ratio, so its G is formed with a unit
    coefficient and kept (tiles.keep_bytes) until every token is scored: 3 GEMMs, 4 for the
    tokens past the budget; not with an entropy bonus. The same holds for vespo,
    off_policy_mask_threshold, top_entropy_quantile < 1 and an on-policy rollout_correction:
    their coefficients need the whole sequence or batch), "recompute" (the generic op: backward
    recomputes each tile, 4 GEMMs), "auto" (the plan chooser, alignkit/ops/plan.py, within
    tiles.memory, measured on the first calls of each plan key; the recompute under no_grad and
    torch.compile). tiles: alignkit.TileOptions (memory, plan, autotune, the budgets).
    """
    o = _options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta,
                 kl_estimator, entropy_coef, sapo_temperature_pos, sapo_temperature_neg,
                 kl_importance_weight, dict(
                     rollout_logprobs=rollout_logprobs, rollout_correction=rollout_correction,
                     rollout_correction_min=rollout_correction_min,
                     rollout_correction_max=rollout_correction_max,
                     off_policy_mask_threshold=off_policy_mask_threshold,
                     top_entropy_quantile=top_entropy_quantile, vespo_k_pos=vespo_k_pos,
                     vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                     vespo_lambda_neg=vespo_lambda_neg))
    check_linear_inputs(hidden, weight, labels, bias)
    if segment_ids is None and hidden.dim() != 3:
        raise ValueError("policy_loss needs padded hidden [S, T, H] or packed hidden [N, H] with "
                         f"segment_ids [N]; got hidden {tuple(hidden.shape)} and no segment_ids")
    P = _prepare(o, labels, segment_ids, advantages, old_logprobs, ref_logprobs, ignore_index,
                 max_completion_length, num_items, torch.float32)
    flat, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    tiles = tiles or TileOptions()
    mode = effective_mode(grad_mode, tiles)
    coupled = o["coupled"] is not None
    why = _pass_blocker(mode, grad_mode, o, flat, weight, bias, tiles)

    def recompute(h, w, b):
        lp, ent = linear_token_logprobs(h, w, y, bias=b, ignore_index=ignore_index,
                                        temperature=temperature, softcap=softcap,
                                        return_entropy=True, backend=backend, tiles=tiles)
        return policy_terms(lp, ent if o["entropy_coef"] != 0 else ent.detach(), **P)

    def run_pass(tt):
        lp_opts = LogprobArgs(ignore_index=ignore_index, temperature=temperature,
                                 softcap=softcap, backend=backend, tiles=tt)
        V, H = weight.shape
        po = TokenPassSpec(
            _coefficients(P), lambda lp, ent: policy_terms(lp, ent, **P)[0], lp_opts,
            tile_rows(V, weight.device, weight.dtype, tt, H=H, backend=backend),
            tt.resolved().vocab_block, entropy=True, coupled=coupled,
            keep=keep_rows(V, H, weight.device, weight.dtype, tt, backend) if coupled else 0)

        def run(h, w, b):
            value, lp, ent = token_pass_loss(h, w, y, b, po)
            return value, policy_terms(lp, ent, **P)[1]
        return run

    if why not in (None, NO_GRAD) and mode == "single_pass":
        raise ValueError(f"grad_mode='single_pass' / plan cannot serve this call: {why}")
    if why is not None or torch.compiler.is_compiling():
        # no gradient wanted, float64, ...; and torch.compile, which cannot time candidates
        note("recompute", "pinned" if mode == "recompute" else why or "torch.compile")
        return recompute(flat, weight, bias)
    t = tiles.resolved(head=tuple(weight.shape))
    rows = flat.shape[0]
    be = resolve(backend, weight.device)
    # a coupled loss (sequence-level importance sampling, ...: o["coupled"]) defers every token
    # (its coefficient needs the whole sequence or batch first); a token-level one none
    cands = candidates(weight, flat, rows, be, t, recompute, run_pass, rows if coupled else 0)
    key = plan_key("token:coupled" if coupled else "token", weight.device, weight.dtype, be,
                   *weight.shape, rows, P["S"], t.memory)
    return choose_and_run(key, cands, t, flat, weight, bias, rows, pinned_plan(mode, t),
                          tiles.memory_given())


def policy_loss_from_logprobs(logprobs: Tensor, entropy: Optional[Tensor], labels: Tensor, *,
                              advantages: Tensor, old_logprobs: Optional[Tensor] = None,
                              ref_logprobs: Optional[Tensor] = None,
                              segment_ids: Optional[Tensor] = None, loss_type: str = "dapo",
                              importance_sampling_level: str = "token",
                              epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
                              delta: Optional[float] = None, beta: float = 0.0,
                              kl_estimator: str = "k3", entropy_coef: float = 0.0,
                              max_completion_length: Optional[int] = None,
                              ignore_index: int = -100, num_items: Optional[Tensor | int] = None,
                              sapo_temperature_pos: float = 1.0,
                              sapo_temperature_neg: float = 1.05,
                              kl_importance_weight: bool = True,
                              rollout_logprobs: Optional[Tensor] = None,
                              rollout_correction: Optional[str] = None,
                              rollout_correction_min: Optional[float] = None,
                              rollout_correction_max: Optional[float] = 3.0,
                              off_policy_mask_threshold: Optional[float] = None,
                              top_entropy_quantile: float = 1.0, vespo_k_pos: float = 2.0,
                              vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                              vespo_lambda_neg: float = 2.0):
    """The loss half of ``policy_loss``, on per-token log-probs (and entropies) you already have,
    of the labels' shape, in their dtype (float64 for an oracle); the same options, terms and
    metrics. entropy=None: no entropy bonus, and the entropy metric reads 0."""
    o = _options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta,
                 kl_estimator, entropy_coef, sapo_temperature_pos, sapo_temperature_neg,
                 kl_importance_weight, dict(
                     rollout_logprobs=rollout_logprobs, rollout_correction=rollout_correction,
                     rollout_correction_min=rollout_correction_min,
                     rollout_correction_max=rollout_correction_max,
                     off_policy_mask_threshold=off_policy_mask_threshold,
                     top_entropy_quantile=top_entropy_quantile, vespo_k_pos=vespo_k_pos,
                     vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                     vespo_lambda_neg=vespo_lambda_neg))
    if entropy is None:
        if o["entropy_coef"] != 0:
            raise ValueError("entropy_coef != 0 needs the entropy")
        entropy = torch.zeros_like(logprobs)
    elif o["entropy_coef"] == 0:
        entropy = entropy.detach()
    P = _prepare(o, labels, segment_ids, advantages, old_logprobs, ref_logprobs, ignore_index,
                 max_completion_length, num_items, logprobs.dtype)
    return policy_terms(logprobs.reshape(-1), entropy.reshape(-1), **P)


def _prepare(o, labels, segment_ids, advantages, old_logprobs, ref_logprobs, ignore_index,
             max_len, num_items, dtype) -> dict:
    """Checks the per-token inputs, and returns policy_terms's keyword arguments: old / ref /
    advantages per token in dtype, the label mask, each token's sequence, S, the
    normalisation weights, the options and the per-sequence advantages (or None)."""
    S, seg = _sequences(labels, segment_ids, advantages)
    adv = _per_token("advantages", advantages, labels, S, seg, dtype)
    old = _token_tensor("old_logprobs", old_logprobs, labels, dtype)
    ref = _token_tensor("ref_logprobs", ref_logprobs, labels, dtype)
    rollout = _token_tensor("rollout_logprobs", o.pop("rollout"), labels, dtype)
    if o["beta"] > 0 and ref is None:
        raise ValueError("beta > 0 needs ref_logprobs (per token, the labels' shape)")
    if o["beta"] == 0 and ref is not None:
        raise ValueError("ref_logprobs is read only with beta > 0; it would be ignored, so it is "
                         "refused")
    if o["loss_type"] == "dr_grpo" and max_len is None:
        if segment_ids is not None:
            raise ValueError("dr_grpo divides by S·max_completion_length: give "
                             "max_completion_length for packed input")
        max_len = labels.shape[-1]
    if max_len is not None:
        check_number("max_completion_length", max_len, low=1)
    if num_items is not None and o["loss_type"] not in ("dapo", "cispo", "vespo"):
        raise ValueError(f"num_items applies to dapo, cispo and vespo, not {o['loss_type']!r}")
    mask = labels.reshape(-1) != ignore_index
    o["coupled"] = coupling_reason(o, old is not None)
    is_ratio = None
    if o["rc"] is not None and old is not None:        # known before the pass
        keep = mask.to(dtype)
        is_ratio = rollout_ratio(torch.where(mask, old, 0), rollout, keep, seg, S, o)
    seq_adv = advantages.detach().to(dtype) if tuple(advantages.shape) == (S,) and \
        tuple(advantages.shape) != tuple(labels.shape) else None
    return dict(old=old, ref=ref, adv=adv, mask=mask, seg=seg, S=S,
                norm=_normaliser(o["loss_type"], mask, seg, S, max_len, num_items, dtype), o=o,
                seq_adv=seq_adv, rollout=rollout, is_ratio=is_ratio)


def _pass_blocker(mode, grad_mode, o, hidden, weight, bias, tiles=None):
    """Why the token pass cannot serve this call (None where it can); the pair pass's reasons
    (pass_budget.pass_blocker) and one of its own. A plan pinned by tiles.plan leaves grad_mode
    "auto": without a gradient, the recompute."""
    if mode == "recompute":
        return "recompute"
    why = pass_blocker(hidden, weight, bias, grad_mode if grad_mode != "auto" else "auto", tiles)
    coupled = o.get("coupled", "sequence-level importance sampling" if o["level"] != "token"
                    else None)                 # _prepare sets it; a bare option dict may not
    if why is None and coupled is not None and o["entropy_coef"] != 0:
        # a kept G carries one unknown scale per row; the entropy term's gradient is a second
        # matrix beside it (−p·(log p + H)), which would need its own buffer or GEMMs
        why = (f"{coupled} with an entropy bonus (its kept G tiles take one scale per token; "
               "the entropy term would be a second one)")
    return why


def _coefficients(P):
    """The token pass's per-row coefficients: dL/dlp_t and dL/dH_t of the tile's tokens ic (flat
    indices), by autograd on their own terms (a token-level loss is a sum of per-token terms).
    P: _prepare's arguments of policy_terms."""
    old, ref, adv, norm, o = P["old"], P["ref"], P["adv"], P["norm"], P["o"]
    pw = P["is_ratio"]              # the rollout ratio, known before the pass (or None)
    n = P["mask"].float().sum().clamp(min=1)

    def coef(ic, lp, ent):
        with torch.enable_grad():
            lp = lp.detach().requires_grad_()
            old_ = old.index_select(0, ic) if old is not None else lp.detach()
            ref_ = ref.index_select(0, ic) if ref is not None else None
            term, _, _ = token_terms(lp, old_, ref_, adv.index_select(0, ic), o,
                                     pw=pw.index_select(0, ic) if pw is not None else None)
            total = (term * norm.index_select(0, ic)).sum()
            g_lp = torch.autograd.grad(total, lp)[0]
        g_ent = None
        if o["entropy_coef"] != 0:
            g_ent = torch.full_like(lp, -o["entropy_coef"]) / n
        return g_lp.contiguous(), g_ent
    return coef


def _options(loss_type, level, eps_low, eps_high, delta, beta, kl_estimator, entropy_coef,
             t_pos, t_neg, kl_iw, corrections) -> dict:
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(POLICY_LOSS_TYPES)}")
    if level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {', '.join(IS_LEVELS)}, got "
                         f"{level!r}")
    if loss_type == "luspo" and level == "token":
        raise ValueError("luspo sums each sequence's terms: it needs "
                         "importance_sampling_level='sequence' (as TRL requires)")
    if level != "token" and loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        raise ValueError(f"importance_sampling_level={level!r} with {loss_type!r}: that loss "
                         "sums per-token terms, so longer sequences would count more (TRL "
                         "refuses it too); use grpo, sapo, luspo or ppo")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got "
                         f"{kl_estimator!r}")
    check_number("epsilon_low", eps_low, low=0)
    eps_high = eps_low if eps_high is None else eps_high
    check_number("epsilon_high", eps_high, low=0)
    if delta is not None:
        check_number("delta", delta, low=1, low_open=True)
        if loss_type not in _CLIPPED:
            raise ValueError(f"delta (two-sided clipping) applies to {', '.join(_CLIPPED)}, not "
                             f"{loss_type!r}")
    check_number("beta", beta, low=0)
    check_number("entropy_coef", entropy_coef)
    check_number("sapo_temperature_pos", t_pos, low=0, low_open=True)
    check_number("sapo_temperature_neg", t_neg, low=0, low_open=True)
    if not isinstance(kl_iw, bool):
        raise TypeError(f"kl_importance_weight must be a bool, got {kl_iw!r}")
    o = dict(loss_type=loss_type, level=level, eps_low=float(eps_low),
             eps_high=float(eps_high), delta=delta, beta=float(beta), kl=kl_estimator,
             entropy_coef=float(entropy_coef), t_pos=float(t_pos), t_neg=float(t_neg),
             kl_iw=kl_iw)
    c = corrections
    o.update(correction_options(
        o, rollout_given=c["rollout_logprobs"] is not None,
        rollout_correction=c["rollout_correction"], rc_min=c["rollout_correction_min"],
        rc_max=c["rollout_correction_max"],
        off_policy_mask_threshold=c["off_policy_mask_threshold"],
        top_entropy_quantile=c["top_entropy_quantile"],
        vespo=tuple(c[k] for k in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                                   "vespo_lambda_neg"))))
    o["rollout"] = c["rollout_logprobs"]            # _prepare checks and takes it
    return o



def _sequences(labels, segment_ids, advantages=None):
    """(S, the sequence of each token [N]): padded labels [S, T], or packed with segment_ids
    (S = max id + 1; under torch.compile, where S must be static, the length of per-sequence
    advantages [S])."""
    S = None
    if segment_ids is not None and torch.compiler.is_compiling() and \
            isinstance(advantages, Tensor) and advantages.dim() == 1 and \
            tuple(advantages.shape) != tuple(labels.shape):
        S = advantages.shape[0]
    seg, S = sequence_layout(labels, segment_ids, S, who="policy_loss")
    if seg is None:
        seg = torch.arange(S, device=labels.device).repeat_interleave(labels.shape[1])
    return S, seg


def _token_tensor(name, t, labels, dtype):
    if t is None:
        return None
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(labels.shape):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be per token, the labels' shape {tuple(labels.shape)}; "
                         f"got {shape}")
    return t.detach().reshape(-1).to(dtype)


def _per_token(name, t, labels, S, seg, dtype):
    if isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == S and \
            tuple(t.shape) != tuple(labels.shape):
        return t.detach().to(dtype).index_select(0, seg)
    if isinstance(t, Tensor) and tuple(t.shape) == tuple(labels.shape):
        return t.detach().reshape(-1).to(dtype)
    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
    raise ValueError(f"{name} must be [S] = ({S},) or per token {tuple(labels.shape)}; got {shape}")


def _normaliser(loss_type, mask, seg, S, max_len, num_items, dtype=torch.float32) -> Tensor:
    """Per-token weight [N] of the normalisation: the loss is Σ_t weight_t·ℓ_t."""
    m = mask.to(dtype)
    counts = torch.zeros(S, device=m.device, dtype=dtype).index_add_(0, seg, m)
    if loss_type in ("grpo", "sapo"):
        return m / (counts.clamp(min=1)[seg] * S)
    if loss_type in ("bnpo", "ppo"):
        return m / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return m / (S * max_len)
    if loss_type in ("dapo", "cispo", "vespo"):
        n = m.sum() if num_items is None else torch.as_tensor(num_items, dtype=dtype,
                                                              device=m.device)
        return m / n.clamp(min=1)
    return m / S                                                   # luspo


__all__ = ["policy_loss", "policy_loss_from_logprobs", "POLICY_LOSS_TYPES", "KL_ESTIMATORS",
           "IS_LEVELS", "kl_estimate", "policy_terms"]
