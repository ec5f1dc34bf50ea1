"""RL policy losses from hidden states: PPO and the GRPO family, with a KL penalty to a reference
and an entropy bonus, on the fused head (no [tokens x vocab] logits).

Per labelled token t of sequence s (lp = log π(y_t), old = log π_old(y_t), ref = log π_ref(y_t),
A the advantage of s or of t, ε_l = epsilon_low, ε_h = epsilon_high):
    w_t = lp − old (token), or w_s = Σ_{t∈s}(lp − old)/|s| for every t of s (sequence: GSPO,
          Zheng et al. 2025, arXiv:2507.18071);  ρ = exp(w)
    grpo, bnpo, dr_grpo, dapo, luspo, ppo:  ℓ = −min(ρ'·A, clip(ρ, 1−ε_l, 1+ε_h)·A)
          (ρ' = min(ρ, delta) with delta, two-sided clipping; PPO: Schulman et al. 2017,
          arXiv:1707.06347; GRPO: Shao et al. 2024, arXiv:2402.03300)
    cispo: ℓ = −sg(min(ρ, ε_h))·A·lp          (MiniMax-M1, arXiv:2506.13585; ε_h caps ρ)
    sapo:  ℓ = −σ(τ(ρ − 1))·4/τ·A, τ = τ₊ if A > 0 else τ₋
          (Soft Adaptive Policy Optimization, arXiv:2511.20347)
    KL (beta > 0), with d = ref − lp:  k1 = −d,  k2 = d²/2,  k3 = eᵈ − d − 1   (Schulman 2020,
          "Approximating KL divergence"); ℓ += β·k (·ρ with kl_importance_weight, TRL's
          use_bias_correction_kl)
The per-token terms are then normalised (|s| labelled tokens of s, S sequences, N = Σ|s|):
    grpo, sapo   (1/S)·Σ_s (1/|s|)·Σ_t ℓ        bnpo, ppo    (1/N)·Σ ℓ
    dr_grpo      Σ ℓ / (S·max_completion_length)   (Liu et al. 2025, arXiv:2503.20783)
    dapo, cispo  Σ ℓ / num_items (default N; pass the count of the whole accumulation window)
                 (DAPO, Yu et al. 2025, arXiv:2503.14476)
    luspo        (1/S)·Σ_s Σ_t ℓ                (LUSPO, arXiv:2602.05261)
and the entropy bonus is −entropy_coef·(1/N)·Σ H_t, with H the entropy of the full distribution
and its true gradient through the softmax.

These are TRL 1.16 GRPOTrainer._compute_loss's terms and normalisations (tests/test_policy.py
checks them against it); ppo and the k1/k2 estimators are alignkit's additions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.api import linear_token_logprobs
from alignkit.losses.options import check_number
from alignkit.ops.backends import autocast_head, resolve
from alignkit.ops.options import LogprobOptions, TileOptions
from alignkit.ops.pass_budget import (effective_mode, keep_rows, pass_blocker, pinned_plan,
                                      tile_rows)
from alignkit.ops.plan import candidates, choose_and_run, note, plan_key
from alignkit.ops.token_pass import TokenPassOptions, token_pass_loss
from alignkit.ops.validate import (
    check_linear_inputs,
    check_segment_ids,
    check_segment_range,
)

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "ppo")
KL_ESTIMATORS = ("k1", "k2", "k3")
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
                kl_importance_weight: bool = False, backend: str = "auto",
                grad_mode: str = "auto", tiles=None):
    """A policy-gradient loss of completions, from hidden states (formulas: module docstring).

    Shapes: padded hidden [S, T, H] and labels [S, T], or packed hidden [N, H], labels [N] and
    segment_ids [N] in [0, S). Labels are aligned with hidden (label i scored from hidden i);
    ignore_index marks prompt and padding. advantages: [S], or per token (the labels' shape).
    old_logprobs / ref_logprobs: per token, the labels' shape (ignored positions are not read);
    old_logprobs=None is on-policy (the detached current log-probs). epsilon_high=None means
    epsilon_low (cispo: the cap on the ratio). num_items: the labelled-token count dapo and cispo
    divide by (default: this batch's).

    Returns (loss, metrics): 0-dim loss; metrics 0-dim detached tensors with TRL's keys:
    ``entropy``, ``kl`` (beta > 0), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max`` (clipped types),
    ``cispo_clip_ratio`` (cispo). Differentiable w.r.t. hidden, weight and bias.

    grad_mode: "single_pass" (G is formed in the forward pass from full-vocabulary tiles.
    Token-level importance sampling: each token's gradient coefficient is known once its row is
    scored, entropy term included: 3 GEMMs for any number of sequences. Sequence-level: a
    token's coefficient needs its sequence's mean ratio, so its G is formed with a unit
    coefficient and kept (tiles.keep_bytes) until every token is scored: 3 GEMMs, 4 for the
    tokens past the budget; not with an entropy bonus), "recompute" (the generic op: backward
    recomputes each tile, 4 GEMMs), "auto" (the single pass where it applies and pays, as
    preference_loss decides: long tiles, and at the sequence level the keep budget; the
    recompute under no_grad and torch.compile).
    """
    o = _options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta,
                 kl_estimator, entropy_coef, sapo_temperature_pos, sapo_temperature_neg,
                 kl_importance_weight)
    check_linear_inputs(hidden, weight, labels, bias)
    if segment_ids is None and hidden.dim() != 3:
        raise ValueError("policy_loss needs padded hidden [S, T, H] or packed hidden [N, H] with "
                         f"segment_ids [N]; got hidden {tuple(hidden.shape)} and no segment_ids")
    P = _prepare(o, labels, segment_ids, advantages, old_logprobs, ref_logprobs, ignore_index,
                 max_completion_length, num_items, torch.float32)
    flat, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    tiles = tiles or TileOptions()
    mode = effective_mode(grad_mode, tiles)
    coupled = o["level"] == "sequence"
    why = _pass_blocker(mode, o, flat, weight, bias)

    def recompute(h, w, b):
        lp, ent = linear_token_logprobs(h, w, y, bias=b, ignore_index=ignore_index,
                                        temperature=temperature, softcap=softcap,
                                        return_entropy=True, backend=backend, tiles=tiles)
        return policy_terms(lp, ent if o["entropy_coef"] != 0 else ent.detach(), **P)

    def run_pass(tt):
        lp_opts = LogprobOptions(ignore_index=ignore_index, temperature=temperature,
                                 softcap=softcap, backend=backend, tiles=tt)
        V, H = weight.shape
        po = TokenPassOptions(
            _coefficients(P), lambda lp, ent: policy_terms(lp, ent, **P)[0], lp_opts,
            tile_rows(V, weight.device, weight.dtype, tt, H=H, backend=backend),
            tt.resolved().vocab_block, entropy=True, coupled=coupled,
            keep=keep_rows(V, H, weight.device, weight.dtype, tt, backend) if coupled else 0)

        def run(h, w, b):
            value, lp, ent = token_pass_loss(h, w, y, b, po)
            return value, policy_terms(lp, ent, **P)[1]
        return run

    if why is not None and mode == "single_pass":
        raise ValueError(f"grad_mode='single_pass' cannot serve this call: {why}")
    if why is not None or torch.compiler.is_compiling():
        # no gradient wanted, float64, ...; and torch.compile, which cannot time candidates
        note("recompute", "pinned" if mode == "recompute" else why or "torch.compile")
        return recompute(flat, weight, bias)
    t = tiles.resolved(head=tuple(weight.shape))
    rows = flat.shape[0]
    be = resolve(backend, weight.device)
    # sequence-level importance sampling defers every token (its coefficient needs its
    # sequence's mean ratio); token level none
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
                              kl_importance_weight: bool = False):
    """The loss half of ``policy_loss``, on per-token log-probs (and entropies) you already have,
    of the labels' shape, in their dtype (float64 for an oracle); the same options, terms and
    metrics. entropy=None: no entropy bonus, and the entropy metric reads 0."""
    o = _options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta,
                 kl_estimator, entropy_coef, sapo_temperature_pos, sapo_temperature_neg,
                 kl_importance_weight)
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
    if num_items is not None and o["loss_type"] not in ("dapo", "cispo"):
        raise ValueError(f"num_items applies to dapo and cispo, not {o['loss_type']!r}")
    mask = labels.reshape(-1) != ignore_index
    seq_adv = advantages.detach().to(dtype) if tuple(advantages.shape) == (S,) and \
        tuple(advantages.shape) != tuple(labels.shape) else None
    return dict(old=old, ref=ref, adv=adv, mask=mask, seg=seg, S=S,
                norm=_normaliser(o["loss_type"], mask, seg, S, max_len, num_items, dtype), o=o,
                seq_adv=seq_adv)


def _pass_blocker(mode, o, hidden, weight, bias):
    """Why the token pass cannot serve this call (None where it can); the pair pass's reasons
    (pass_budget.pass_blocker) and one of its own."""
    if mode == "recompute":
        return "recompute"
    why = pass_blocker(hidden, weight, bias, mode)
    if why is None and o["level"] == "sequence" and o["entropy_coef"] != 0:
        # a kept G carries one unknown scale per row; the entropy term's gradient is a second
        # matrix beside it (−p·(log p + H)), which would need its own buffer or GEMMs
        why = ("sequence-level importance sampling with an entropy bonus (its kept G tiles take "
               "one scale per token; the entropy term would be a second one)")
    return why


def _coefficients(P):
    """The token pass's per-row coefficients: dL/dlp_t and dL/dH_t of the tile's tokens ic (flat
    indices), by autograd on their own terms (a token-level loss is a sum of per-token terms).
    P: _prepare's arguments of policy_terms."""
    old, ref, adv, norm, o = P["old"], P["ref"], P["adv"], P["norm"], P["o"]
    n = P["mask"].float().sum().clamp(min=1)

    def coef(ic, lp, ent):
        with torch.enable_grad():
            lp = lp.detach().requires_grad_()
            old_ = old.index_select(0, ic) if old is not None else lp.detach()
            ref_ = ref.index_select(0, ic) if ref is not None else None
            term, _, _ = token_terms(lp, old_, ref_, adv.index_select(0, ic), o)
            total = (term * norm.index_select(0, ic)).sum()
            g_lp = torch.autograd.grad(total, lp)[0]
        g_ent = None
        if o["entropy_coef"] != 0:
            g_ent = torch.full_like(lp, -o["entropy_coef"]) / n
        return g_lp.contiguous(), g_ent
    return coef


def _options(loss_type, level, eps_low, eps_high, delta, beta, kl_estimator, entropy_coef,
             t_pos, t_neg, kl_iw) -> dict:
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(POLICY_LOSS_TYPES)}")
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")
    if loss_type == "luspo" and level != "sequence":
        raise ValueError("luspo sums each sequence's terms: it needs "
                         "importance_sampling_level='sequence' (as TRL requires)")
    if level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        raise ValueError(f"importance_sampling_level='sequence' with {loss_type!r}: that loss "
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
    return dict(loss_type=loss_type, level=level, eps_low=float(eps_low),
                eps_high=float(eps_high), delta=delta, beta=float(beta), kl=kl_estimator,
                entropy_coef=float(entropy_coef), t_pos=float(t_pos), t_neg=float(t_neg),
                kl_iw=kl_iw)


def _sequences(labels, segment_ids, advantages=None):
    """(S, the sequence of each token [N]): padded labels [S, T], or packed with segment_ids
    (S = max id + 1; under torch.compile, where S must be static, the length of per-sequence
    advantages [S])."""
    if segment_ids is None:
        if labels.dim() != 2:
            raise ValueError("padded input needs labels [S, T]; for packed input pass "
                             f"segment_ids [N]. Got labels {tuple(labels.shape)}")
        S, T = labels.shape
        return S, torch.arange(S, device=labels.device).repeat_interleave(T)
    seg = check_segment_ids(segment_ids, labels, None)
    S = None
    if torch.compiler.is_compiling() and isinstance(advantages, Tensor) and \
            advantages.dim() == 1 and tuple(advantages.shape) != tuple(labels.shape):
        S = advantages.shape[0]
    return check_segment_range(seg, S), seg


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
    if loss_type in ("dapo", "cispo"):
        n = m.sum() if num_items is None else torch.as_tensor(num_items, dtype=dtype,
                                                              device=m.device)
        return m / n.clamp(min=1)
    return m / S                                                   # luspo


def kl_estimate(lp: Tensor, ref: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled token's log-probs, with d = ref − lp:
    k1 = −d, k2 = d²/2, k3 = eᵈ − d − 1 (Schulman 2020, "Approximating KL divergence")."""
    d = ref - lp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")


def token_terms(lp, old, ref, adv, o, w=None):
    """Per-token ℓ_t (before normalisation) and the ratio ρ; w: the log importance weight
    (default lp − old, the token level)."""
    w = (lp - old) if w is None else w
    rho = torch.exp(w)
    lt = o["loss_type"]
    if lt == "cispo":
        term = -torch.clamp(rho, max=o["eps_high"]).detach() * adv * lp
    elif lt == "sapo":
        tau = torch.where(adv > 0, o["t_pos"], o["t_neg"])
        term = -torch.sigmoid(tau * (rho - 1)) * 4 / tau * adv
    else:
        clipped = torch.clamp(rho, 1 - o["eps_low"], 1 + o["eps_high"])
        r1 = torch.clamp(rho, max=o["delta"]) if o["delta"] is not None else rho
        term = -torch.minimum(r1 * adv, clipped * adv)
    kl = None
    if o["beta"] > 0:
        kl = kl_estimate(lp, ref, o["kl"])
        if o["kl_iw"]:
            kl = kl * rho
        term = term + o["beta"] * kl
    return term, rho, kl


def policy_terms(lp, ent, old, ref, adv, mask, seg, S, norm, o, seq_adv=None):
    """(loss, metrics) from per-token log-probs lp [N] and entropies ent [N] (differentiable), the
    detached old / ref / advantages [N], the label mask and sequence of each token [N], and the
    normalisation weights [N]; seq_adv: the advantages [S] when given per sequence."""
    keep = mask.to(lp.dtype)
    f = dict(device=lp.device, dtype=lp.dtype)
    old = lp.detach() if old is None else old.to(lp.dtype)
    adv = adv.to(lp.dtype)
    ref = ref.to(lp.dtype) if ref is not None else None
    zero = torch.zeros_like(lp)
    old, ref_ = torch.where(mask, old, zero), (torch.where(mask, ref, zero) if ref is not None
                                               else None)
    w = None
    if o["level"] == "sequence":
        counts = torch.zeros(S, **f).index_add_(0, seg, keep)
        per_seq = torch.zeros(S, **f).index_add(
            0, seg, (lp - old) * keep) / counts.clamp(min=1)
        w = per_seq.index_select(0, seg)
    term, rho, kl = token_terms(lp, old, ref_, adv, o, w)
    loss = (term * norm).sum()
    n = keep.sum().clamp(min=1)
    metrics = {"entropy": (ent.detach() * keep).sum() / n}
    if o["entropy_coef"] != 0:
        loss = loss - o["entropy_coef"] * (ent * keep).sum() / n
    if kl is not None:
        metrics["kl"] = (kl.detach() * keep).sum() / n
    r = rho.detach()
    if o["loss_type"] in _CLIPPED:
        if seq_adv is not None and o["level"] == "sequence":
            # sequence level with one advantage per sequence: one ratio and one flag per
            # sequence, averaged over the S sequences (TRL's (B, 1) metrics)
            first = torch.full((S,), -1, dtype=torch.long, device=lp.device).scatter_reduce(
                0, seg, torch.arange(seg.numel(), device=lp.device), "amax")
            r_s = torch.where(first >= 0, r[first.clamp(min=0)], torch.ones_like(seq_adv))
            lo_s = ((r_s < 1 - o["eps_low"]) & (seq_adv < 0)).to(lp.dtype)
            hi_s = ((r_s > 1 + o["eps_high"]) & (seq_adv > 0)).to(lp.dtype)
            lo_m, hi_m, reg_m = lo_s.mean(), hi_s.mean(), (lo_s + hi_s).clamp(max=1).mean()
            has = torch.ones_like(lo_s, dtype=torch.bool)
        else:
            low = ((r < 1 - o["eps_low"]) & (adv < 0)).to(lp.dtype) * keep
            high = ((r > 1 + o["eps_high"]) & (adv > 0)).to(lp.dtype) * keep
            counts = torch.zeros(S, **f).index_add_(0, seg, keep)
            has = counts > 0

            def seq_mean(x):
                return torch.zeros(S, **f).index_add_(0, seg, x) / counts.clamp(min=1)
            lo_s, hi_s = seq_mean(low), seq_mean(high)
            lo_m, hi_m = low.sum() / n, high.sum() / n
            reg_m = (low + high).clamp(max=1).sum() / n
        metrics.update({
            "clip_ratio/low_mean": lo_m, "clip_ratio/high_mean": hi_m,
            "clip_ratio/region_mean": reg_m,
            "clip_ratio/low_min": _masked_extreme(lo_s, has, "min"),
            "clip_ratio/high_max": _masked_extreme(hi_s, has, "max")})
    elif o["loss_type"] == "cispo":
        metrics["cispo_clip_ratio"] = (((r > o["eps_high"]) & (adv > 0)).to(lp.dtype) *
                                       keep).sum() / n
    return loss, {k: v.detach() for k, v in metrics.items()}


def _masked_extreme(x: Tensor, has: Tensor, how: str) -> Tensor:
    """min (or max) of x over the sequences that have tokens, 0 where none has; with no
    boolean indexing, whose data-dependent size torch.compile cannot trace."""
    fill = float("inf") if how == "min" else float("-inf")
    v = torch.where(has, x, fill)
    v = v.amin() if how == "min" else v.amax()
    return torch.where(has.any(), v, torch.zeros_like(v))


__all__ = ["policy_loss", "policy_loss_from_logprobs", "POLICY_LOSS_TYPES", "KL_ESTIMATORS"]
