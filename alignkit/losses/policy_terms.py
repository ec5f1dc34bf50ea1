"""The per-token and per-sequence formulas of the policy losses (alignkit.losses.policy, whose
module docstring gives them with their papers): the KL estimators, each token's term ℓ_t and
ratio ρ_t, and the loss with TRL's metrics from per-token log-probs. The off-policy corrections
and token selections are alignkit.losses.policy_corrections'.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.losses.policy_corrections import (
    entropy_keep,
    off_policy_keep,
    rollout_ratio,
    vespo_phi,
)

KL_ESTIMATORS = ("k1", "k2", "k3")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "ppo")


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


def token_terms(lp, old, ref, adv, o, w=None, pw: Optional[Tensor] = None,
                phi: Optional[Tensor] = None):
    """Per-token ℓ_t (before normalisation) and the ratio ρ; [N] each. w: the log importance
    weight (default lp − old, the token level); pw: a detached factor of the policy term (the
    rollout ratio and the token masks; not of the KL term); phi: vespo's φ_s per token."""
    w = (lp - old) if w is None else w
    rho = torch.exp(w)
    lt = o["loss_type"]
    if lt == "cispo":
        term = -torch.clamp(rho, max=o["eps_high"]).detach() * adv * lp
    elif lt == "vespo":
        term = -phi * adv * lp
    elif lt == "sapo":
        tau = torch.where(adv > 0, o["t_pos"], o["t_neg"])
        term = -torch.sigmoid(tau * (rho - 1)) * 4 / tau * adv
    else:
        clipped = torch.clamp(rho, 1 - o["eps_low"], 1 + o["eps_high"])
        r1 = torch.clamp(rho, max=o["delta"]) if o["delta"] is not None else rho
        term = -torch.minimum(r1 * adv, clipped * adv)
    if pw is not None:
        term = term * pw
    kl = None
    if o["beta"] > 0:
        kl = kl_estimate(lp, ref, o["kl"])
        if o["kl_iw"]:
            kl = kl * rho
        term = term + o["beta"] * kl
    return term, rho, kl


def policy_terms(lp, ent, old, ref, adv, mask, seg, S, norm, o, seq_adv=None, rollout=None,
                 is_ratio=None):
    """(loss, metrics) from per-token log-probs lp [N] and entropies ent [N] (differentiable), the
    detached old / ref / advantages [N], the label mask and sequence of each token [N], and the
    normalisation weights [N]; seq_adv: the advantages [S] when given per sequence; rollout: the
    sampler's log-probs [N] or None; is_ratio: the rollout ratio [N] when known before the pass
    (old given), else None (formed here)."""
    keep = mask.to(lp.dtype)
    f = dict(device=lp.device, dtype=lp.dtype)
    old = lp.detach() if old is None else old.to(lp.dtype)
    adv = adv.to(lp.dtype)
    ref = ref.to(lp.dtype) if ref is not None else None
    zero = torch.zeros_like(lp)
    old, ref_ = torch.where(mask, old, zero), (torch.where(mask, ref, zero) if ref is not None
                                               else None)
    rollout = rollout.to(lp.dtype) if rollout is not None else None
    w = None
    if o["level"] != "token":
        counts = torch.zeros(S, **f).index_add_(0, seg, keep)
        per_seq = torch.zeros(S, **f).index_add(0, seg, (lp - old) * keep)
        if o["level"] == "sequence":
            per_seq = per_seq / counts.clamp(min=1)
        w = per_seq.index_select(0, seg)
    ratio = None
    if o.get("rc") is not None:
        ratio = is_ratio.to(lp.dtype) if is_ratio is not None else \
            rollout_ratio(old, rollout, keep, seg, S, o)
    pw, phi, ent_mask = None, None, None
    if o["loss_type"] == "vespo":
        phi = vespo_phi(lp.detach(), old, ratio, adv, keep, seg, S, o)
    elif ratio is not None:
        pw = ratio
    if o.get("opm") is not None:
        m = off_policy_keep(lp.detach(), rollout if rollout is not None else old, adv, keep, seg,
                            S, o["opm"])
        pw = m if pw is None else pw * m
    if o.get("teq", 1.0) < 1:
        ent_mask = entropy_keep(ent.detach(), mask, o["teq"])
        pw = ent_mask if pw is None else pw * ent_mask
    term, rho, kl = token_terms(lp, old, ref_, adv, o, w, pw=pw, phi=phi)
    loss = (term * norm).sum()
    n = keep.sum().clamp(min=1)
    metrics = {"entropy": (ent.detach() * keep).sum() / n}
    if o["entropy_coef"] != 0:
        eff = keep if ent_mask is None else keep * ent_mask
        loss = loss - o["entropy_coef"] * (ent * eff).sum() / eff.sum().clamp(min=1)
    if kl is not None:
        metrics["kl"] = (kl.detach() * keep).sum() / n
    r = rho.detach()
    if o["loss_type"] in _CLIPPED:
        if seq_adv is not None and o["level"] != "token":
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
    elif o["loss_type"] == "vespo":
        # TRL's global_masked_mean of φ (B, 1): the mean over the S sequences
        first = torch.full((S,), -1, dtype=torch.long, device=lp.device).scatter_reduce(
            0, seg, torch.arange(seg.numel(), device=lp.device), "amax")
        metrics["vespo/phi_seq_mean"] = torch.where(first >= 0, phi[first.clamp(min=0)],
                                                    torch.zeros(S, **f)).mean()
    return loss, {k: v.detach() for k, v in metrics.items()}


def _masked_extreme(x: Tensor, has: Tensor, how: str) -> Tensor:
    """min (or max) of x over the sequences that have tokens, 0 where none has; with no
    boolean indexing, whose data-dependent size torch.compile cannot trace."""
    fill = float("inf") if how == "min" else float("-inf")
    v = torch.where(has, x, fill)
    v = v.amin() if how == "min" else v.amax()
    return torch.where(has.any(), v, torch.zeros_like(v))


__all__ = ["kl_estimate", "token_terms", "policy_terms", "KL_ESTIMATORS"]
