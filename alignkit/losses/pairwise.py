"""Paired preference losses on sequence log-probs: DPO (and its variants), SimPO, CPO, ORPO.

Every function takes per-sequence log-probs [B] (chosen and rejected of B pairs) and returns
``(loss, metrics)``: a 0-dim loss (mean over pairs) and a dict of detached 0-dim tensors with the
keys TRL logs (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, and ``nll`` where the loss has an NLL term). No ``.item()``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.options import (
    check_beta,
    check_label_smoothing,
    check_number,
    check_pair_tensors,
)

# --------------------------------------------------------------------------------------- DPO
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sigmoid_norm", "sft", "cdpo")
# the loss types that read label_smoothing; for every other type a non-zero value is an error.
# "sigmoid" is not one of them: TRL 1.16's sigmoid ignores label_smoothing, so a ported config
# gives TRL's loss; conservative DPO (cDPO) is its own name, "cdpo".
_SMOOTHED = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")
# the loss types that need token counts (length-normalised, or the token-mean NLL)
_COUNTED = ("ipo", "sigmoid_norm", "sft")
# f-DPO (Wang et al. 2023, arXiv:2309.16240): TRL 1.16's values, and the loss types built on the
# chosen-minus-rejected score difference that take a non-default one (TRL's list, plus cdpo)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_F_DIVERGENCE_TYPES_OK = ("sigmoid", "cdpo", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                          "discopop", "sft")
# WPO: aot / aot_unpaired sort the batch, which would pair a log-ratio with another pair's weight
# (TRL refuses them too); TRL 1.16's sft term cannot be weighted (its in-place product on an
# expanded scalar raises), so there is no TRL definition to match
_NO_WEIGHTING = ("aot", "aot_unpaired", "sft")


def _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).float().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): conservative DPO / cDPO (ε = 0: plain DPO)."""
    loss = -F.logsigmoid(z)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-z)


def f_divergence_scores(logratio: Tensor, kind: str, coef: float) -> Tensor:
    """f'(u) at u = π/π_ref = exp(ρ), the f-DPO score of a log-ratio ρ (TRL 1.16's forms):
        reverse_kl  ρ;   forward_kl  1 − exp(−ρ);   js_divergence  log 2 + log σ(ρ)
        alpha_divergence  (exp((α−1)·ρ) − 1)/(α−1), α = coef (ρ when |α − 1| < 1e-6); the
        exponent is clamped at 80 (11 in fp16) and formed in at least fp32, as TRL does."""
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if abs(coef - 1.0) < 1e-6:
        return logratio
    t = (coef - 1.0) * logratio
    hi = 11.0 if t.dtype == torch.float16 else 80.0
    wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return (torch.exp(torch.clamp(wide, max=hi)) - 1.0).to(t.dtype) / (coef - 1.0)


def wpo_aligned_logps(sums: Tensor, log_sum_sq_sums: Tensor, counts: Tensor) -> Tensor:
    """WPO's per-sequence log-weight (Zhou et al. 2024, arXiv:2406.11827, Eq. 2, as TRL 1.16's
    DPOTrainer forms it), detached: the mean over a sequence's labelled tokens of
    log π(y_t) − log Σ_v π_v², i.e. (Σ_t log π(y_t) − Σ_t log Σ_v π_v²) / max(|y|, 1). [S] each."""
    return ((sums.detach() - log_sum_sq_sums.detach().to(sums.dtype))
            / counts.to(sums.dtype).clamp(min=1))


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1,
             loss_type: Union[str, Sequence[str]] = "sigmoid",
             loss_weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0,
             discopop_tau: Optional[float] = None, chosen_counts: Optional[Tensor] = None,
             rejected_counts: Optional[Tensor] = None, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5, use_weighting: bool = False,
             chosen_aligned_logps: Optional[Tensor] = None,
             rejected_aligned_logps: Optional[Tensor] = None):
    """Direct Preference Optimization and its variants (Rafailov et al. 2023, arXiv:2305.18290).

    With log-ratios ρ_c = logπ(y_c) − logπ_ref(y_c), ρ_r likewise, their f-DPO scores
    s = f'(exp ρ) (``f_divergence_type``; ρ itself for the default reverse_kl, see
    f_divergence_scores), and Δ = s_c − s_r:
        sigmoid       −log σ(βΔ)   (TRL 1.16's sigmoid: label_smoothing does not apply)
        cdpo          −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)            (ε = label_smoothing: cDPO)
        ipo           (Δ̄ − 1/(2β))², Δ̄ on per-token averages      (Azar et al. 2023)
        hinge         relu(1 − βΔ)                               (SLiC)
        robust        [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1−2ε)  (rDPO)
        exo_pair      KL(softmax(βs) ‖ [1−ε, ε]) over the pair    (EXO, ε > 0 required)
        nca_pair      −log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r)
        bco_pair      −log σ(βρ_c) − log σ(−βρ_r)
        sppo_hard     (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²
        aot           cDPO on the sorted batch of policy minus sorted reference log-ratios
        aot_unpaired  cDPO on sorted ρ_c minus sorted ρ_r
        apo_zero      1 − σ(βρ_c) + σ(βρ_r);   apo_down: σ(βρ_c) + 1 − σ(β(ρ_c − ρ_r))
        discopop      (1−m)·(−log σ(βΔ)) + m·exp(−βΔ), m = σ(βΔ/τ)   (τ = discopop_tau, 0.05)
        sigmoid_norm  −log σ(βΔ̄) on per-token averages
        sft           −Σ logπ(y_c) / Σ |y_c|: the NLL on chosen tokens (RPO)
    A non-default f_divergence_type (forward_kl, js_divergence, alpha_divergence with
    ``f_alpha_divergence_coef``) applies to sigmoid, cdpo, sigmoid_norm, hinge, ipo, exo_pair,
    robust, discopop and sft (TRL's list); the others raise.

    WPO (``use_weighting=True``; Zhou et al. 2024, arXiv:2406.11827): every pair's loss is
    multiplied by w_c·w_r, w = exp(chosen/rejected_aligned_logps) (detached; see
    wpo_aligned_logps), before the batch mean, for every loss type but aot, aot_unpaired, sft.

    Practitioner note: DPO only widens the gap Δ, and it can do so by lowering *both* log-probs,
    chosen included ("likelihood displacement"). Adding ``sft`` (e.g. loss_type=["sigmoid", "sft"],
    loss_weights=[1.0, 1.0], as in RPO) anchors the chosen response's likelihood.

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] summed log-probs.
        loss_type: one name or a list, summed with loss_weights (default 1.0 each).
        chosen_counts, rejected_counts: [B] labelled tokens per sequence; needed by ipo,
            sigmoid_norm and sft.
        chosen_aligned_logps, rejected_aligned_logps: [B], WPO's log-weights; required by (and
            only with) use_weighting.
    Returns:
        (loss, metrics); rewards are β·ρ.
    """
    check_pair_tensors(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                       ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    check_beta(beta)
    if not isinstance(loss_type, (str, list, tuple)):
        raise ValueError(f"loss_type must be a name or a list of names, got {loss_type!r}")
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {t!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if loss_weights is None:
        loss_weights = [1.0] * len(types)
    if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__") or \
            len(loss_weights) != len(types):
        raise ValueError(f"loss_weights must have one weight per loss_type ({len(types)}), "
                         f"got {loss_weights!r}")
    for i, w in enumerate(loss_weights):
        check_number(f"loss_weights[{i}]", w)
    check_label_smoothing(label_smoothing)
    if label_smoothing and not any(t in _SMOOTHED for t in types):
        hint = (" (TRL 1.16's sigmoid ignores label_smoothing; conservative DPO is "
                "loss_type 'cdpo')" if "sigmoid" in types else "")
        raise ValueError(f"label_smoothing={label_smoothing} has no effect on loss_type {types}; "
                         f"it applies to: {', '.join(_SMOOTHED)}{hint}")
    if "exo_pair" in types and label_smoothing <= 0:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing in (0, 0.5), e.g. 1e-3 "
                         "(the EXO paper's ε); with 0 its KL target has log(0)")
    if discopop_tau is not None and "discopop" not in types:
        raise ValueError("discopop_tau applies only to loss_type 'discopop'")
    tau = 0.05 if discopop_tau is None else discopop_tau
    check_number("discopop_tau", tau, low=0, low_open=True)
    _check_f_divergence(types, f_divergence_type, f_alpha_divergence_coef)
    weights = _check_weighting(types, use_weighting, chosen_logps, chosen_aligned_logps,
                               rejected_aligned_logps)
    if any(t in _COUNTED for t in types):
        if chosen_counts is None or rejected_counts is None:
            raise ValueError(f"loss_type {[t for t in types if t in _COUNTED]} needs "
                             "chosen_counts and rejected_counts (labelled tokens per sequence)")
        check_pair_tensors(chosen_logps=chosen_logps, chosen_counts=chosen_counts,
                           rejected_counts=rejected_counts)

    rho_c = chosen_logps - ref_chosen_logps
    rho_r = rejected_logps - ref_rejected_logps
    s_c = f_divergence_scores(rho_c, f_divergence_type, f_alpha_divergence_coef)
    s_r = f_divergence_scores(rho_r, f_divergence_type, f_alpha_divergence_coef)
    delta = s_c - s_r
    eps = float(label_smoothing)
    total = chosen_logps.new_zeros(())
    metrics = {}
    for t, w in zip(types, loss_weights):
        if t == "sigmoid":
            per = -F.logsigmoid(beta * delta)
        elif t == "cdpo":
            per = _smoothed_sigmoid(beta * delta, eps)
        elif t in ("ipo", "sigmoid_norm"):
            avg = s_c / chosen_counts.clamp(min=1) - s_r / rejected_counts.clamp(min=1)
            per = (avg - 1 / (2 * beta)) ** 2 if t == "ipo" else -F.logsigmoid(beta * avg)
        elif t == "hinge":
            per = torch.relu(1 - beta * delta)
        elif t == "robust":
            per = (-(1 - eps) * F.logsigmoid(beta * delta)
                   + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif t == "exo_pair":
            z = beta * delta
            per = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                   + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
        elif t == "nca_pair":
            per = (-F.logsigmoid(beta * rho_c) - 0.5 * F.logsigmoid(-beta * rho_c)
                   - 0.5 * F.logsigmoid(-beta * rho_r))
        elif t == "bco_pair":
            per = -F.logsigmoid(beta * rho_c) - F.logsigmoid(-beta * rho_r)
        elif t == "sppo_hard":
            per = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
        elif t == "aot":
            d = (torch.sort(chosen_logps - rejected_logps, dim=0)[0]
                 - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0])
            per = _smoothed_sigmoid(beta * d, eps)
        elif t == "aot_unpaired":
            d = torch.sort(rho_c, dim=0)[0] - torch.sort(rho_r, dim=0)[0]
            per = _smoothed_sigmoid(beta * d, eps)
        elif t == "apo_zero":
            per = 1 - torch.sigmoid(beta * rho_c) + torch.sigmoid(beta * rho_r)
        elif t == "apo_down":
            per = torch.sigmoid(beta * rho_c) + 1 - torch.sigmoid(beta * (rho_c - rho_r))
        elif t == "discopop":
            z = beta * delta
            m = torch.sigmoid(z / tau)
            per = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
        else:  # sft
            nll = -chosen_logps.sum() / chosen_counts.sum().clamp(min=1)
            metrics["nll"] = nll.detach()
            per = nll.expand(chosen_logps.shape[0])
        if weights is not None:
            per = per * weights
        total = total + w * per.mean()
    metrics.update(_reward_metrics(beta * rho_c, beta * rho_r, chosen_logps, rejected_logps))
    return total, metrics


def _check_f_divergence(types, kind, coef):
    if kind not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCE_TYPES)}; "
                         f"got {kind!r}")
    check_number("f_alpha_divergence_coef", coef)
    if kind != "reverse_kl":
        bad = [t for t in types if t not in _F_DIVERGENCE_TYPES_OK]
        if bad:
            raise ValueError(f"f_divergence_type={kind!r} applies to loss types "
                             f"{', '.join(_F_DIVERGENCE_TYPES_OK)}; not to {bad} (as TRL 1.16)")


def _check_weighting(types, use_weighting, like, chosen_aligned, rejected_aligned):
    """WPO's per-pair weight w_c·w_r [B] (detached), or None without use_weighting."""
    if not isinstance(use_weighting, bool):
        raise ValueError(f"use_weighting must be True or False, got {use_weighting!r}")
    given = chosen_aligned is not None or rejected_aligned is not None
    if not use_weighting:
        if given:
            raise ValueError("chosen_aligned_logps / rejected_aligned_logps are WPO's weights: "
                             "they apply only with use_weighting=True")
        return None
    bad = [t for t in types if t in _NO_WEIGHTING]
    if bad:
        raise ValueError(f"use_weighting (WPO) does not apply to loss_type {bad}: aot and "
                         "aot_unpaired sort the batch, which would pair a log-ratio with another "
                         "pair's weight; TRL 1.16 cannot weight sft (its trainer raises)")
    if chosen_aligned is None or rejected_aligned is None:
        raise ValueError("use_weighting=True needs chosen_aligned_logps and "
                         "rejected_aligned_logps [B] (see wpo_aligned_logps)")
    check_pair_tensors(chosen_logps=like, chosen_aligned_logps=chosen_aligned,
                       rejected_aligned_logps=rejected_aligned)
    return torch.exp(chosen_aligned.detach() + rejected_aligned.detach()).to(like.dtype)


# ------------------------------------------------------------------------------------- SimPO
def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 2.0,
               gamma: float = 1.0, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, arXiv:2405.14734): reference-free, length-normalised.

        loss = −(1−ε)·log σ(β·(ā_c − ā_r) − γ) − ε·log σ(−(β·(ā_c − ā_r) − γ))

    ā are per-token *average* log-probs [B]; γ is the absolute target reward margin (the paper's
    γ, TRL's ``simpo_gamma``); rewards are β·ā.
    """
    check_pair_tensors(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    check_beta(beta)
    check_number("gamma", gamma)
    check_label_smoothing(label_smoothing)
    z = beta * (chosen_logps - rejected_logps) - gamma
    loss = _smoothed_sigmoid(z, float(label_smoothing)).mean()
    return loss, _reward_metrics(beta * chosen_logps, beta * rejected_logps, chosen_logps,
                                 rejected_logps)


# --------------------------------------------------------------------------------------- CPO
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def cpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, nll: Optional[Tensor] = None,
             beta: float = 0.1, cpo_alpha: Optional[float] = None, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, alpha: float = 0.0):
    """Contrastive Preference Optimization (Xu et al. 2024, arXiv:2401.08417), with TRL 1.16's
    CPOTrainer options: SimPO (Meng et al. 2024, arXiv:2405.14734) and AlphaPO (Gupta et al.
    2025, arXiv:2501.03884).

        u = logπ(y) (alpha = 0), else AlphaPO's reward u = (1 − π(y)^(−α))/α = −expm1(−α·logπ)/α
        Δ = u_c − u_r
        sigmoid: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ);  hinge: relu(1 − βΔ);  ipo: (Δ − 1/(2β))²
        simpo:   −(1−ε)·log σ(βΔ − γ) − ε·log σ(−(βΔ − γ)),  γ = simpo_gamma
        alphapo: simpo without the NLL term (TRL sets cpo_alpha = 0 for it)
        loss = mean(pref) + cpo_alpha·NLL,   NLL = −Σ logπ(y_c) / Σ|y_c|  (token mean over chosen)

    chosen_logps, rejected_logps: [B] (TRL: sums for sigmoid/hinge, per-token averages for
    ipo/simpo/alphapo); nll: the 0-dim NLL term, required when cpo_alpha > 0. cpo_alpha: the NLL
    weight (TRL's name; default 1.0, 0.0 for alphapo, where another value raises). alpha:
    AlphaPO's reward shape, any loss type (TRL's ``alpha``, default 0). Rewards are β·u.
    """
    check_pair_tensors(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; valid: {', '.join(CPO_LOSS_TYPES)}")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing applies to CPO loss_type sigmoid, simpo and alphapo, "
                         f"not {loss_type!r}")
    check_number("simpo_gamma", simpo_gamma)
    if simpo_gamma != 0.5 and loss_type not in ("simpo", "alphapo"):
        raise ValueError(f"simpo_gamma applies to CPO loss_type simpo and alphapo, not "
                         f"{loss_type!r}")
    check_number("alpha", alpha)
    if loss_type == "alphapo":
        if cpo_alpha not in (None, 0, 0.0):
            raise ValueError(f"cpo_alpha={cpo_alpha!r} with loss_type 'alphapo': alphapo is simpo "
                             "without the NLL term (TRL sets cpo_alpha=0); for both use "
                             "loss_type='simpo' with alpha and cpo_alpha")
        cpo_alpha = 0.0
    cpo_alpha = 1.0 if cpo_alpha is None else cpo_alpha
    check_number("cpo_alpha", cpo_alpha, low=0)
    if cpo_alpha > 0 and nll is None:
        raise ValueError("cpo_loss with cpo_alpha > 0 needs nll (the NLL of the chosen tokens)")
    if alpha != 0:
        u_c = -torch.expm1(-alpha * chosen_logps) / alpha
        u_r = -torch.expm1(-alpha * rejected_logps) / alpha
    else:
        u_c, u_r = chosen_logps, rejected_logps
    delta = u_c - u_r
    if loss_type == "sigmoid":
        pref = _smoothed_sigmoid(beta * delta, float(label_smoothing))
    elif loss_type in ("simpo", "alphapo"):
        pref = _smoothed_sigmoid(beta * delta - simpo_gamma, float(label_smoothing))
    elif loss_type == "hinge":
        pref = torch.relu(1 - beta * delta)
    else:
        pref = (delta - 1 / (2 * beta)) ** 2
    loss = pref.mean()
    metrics = _reward_metrics(beta * u_c, beta * u_r, chosen_logps, rejected_logps)
    if nll is not None:
        metrics["nll"] = nll.detach()
        if cpo_alpha > 0:
            loss = loss + cpo_alpha * nll
    return loss, metrics


# -------------------------------------------------------------------------------------- ORPO
def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, nll: Tensor, beta: float = 0.1):
    """ORPO (Hong et al. 2024, arXiv:2403.07691), on per-token average log-probs ā [B]:

        log odds(y) = ā − log(1 − exp(ā))
        loss = NLL − β·mean log σ(log odds(y_c) − log odds(y_r))

    nll: 0-dim NLL of the chosen tokens (token mean). Rewards are β·ā. Extra metrics:
    ``log_odds_ratio`` (mean log σ term) and ``log_odds_chosen``.
    """
    check_pair_tensors(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    check_beta(beta)
    c, r = chosen_logps.float(), rejected_logps.float()
    # ā = 0 (a sequence certain of itself, or one with no labelled token) has infinite odds;
    # clamp a hair below 0 so the loss stays finite.
    c, r = c.clamp(max=-1e-6), r.clamp(max=-1e-6)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = nll - beta * ratio.mean()
    metrics = _reward_metrics(beta * chosen_logps, beta * rejected_logps, chosen_logps,
                              rejected_logps)
    metrics.update(nll=nll.detach(), log_odds_ratio=ratio.detach().mean(),
                   log_odds_chosen=log_odds.detach().mean())
    return loss, metrics
