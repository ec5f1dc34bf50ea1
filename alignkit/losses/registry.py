"""One entry per loss: everything else (preference_loss, the single pass, the trainer's config
and objective, the oracle, the bench) reads what a loss is from here.

A paired loss is a function of the 2B per-sequence log-probs (chosen 0..B-1, then rejected) in its
reduction (sums, or per-token averages), plus, for some, the NLL of the chosen tokens. Its *tie*
tells the single pass how the per-sequence gradients relate (alignkit/ops/pair_pass.py):
    unit    dL/dr = −dL/dc for each pair (a function of c − r)
    count   dL/dr = −(|c|/|r|)·dL/dc (a function of c/|c| − r/|r|, on sums)
    untied  two unrelated scalars
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from alignkit.losses.pairwise import cpo_loss, dpo_loss, orpo_loss, simpo_loss, wpo_aligned_logps
from alignkit.losses.unpaired import kto_loss

# DPO types that are a function of the log-ratio difference Δ (on sums) ...
_UNIT = {"sigmoid", "cdpo", "hinge", "robust", "exo_pair", "discopop", "aot", "aot_unpaired"}
# ... or of the difference of per-token averages (the count normalisation)
_COUNT = {"ipo", "sigmoid_norm"}
# aot_unpaired sorts the chosen and the rejected log-ratios of the batch separately, so with
# several pairs a chosen sequence is matched with another pair's rejected one: tied for one pair
_ONE_PAIR_ONLY = {"aot_unpaired"}


def _dpo_tie(own: dict, pairs: int) -> str:
    types = own.get("loss_type", "sigmoid")
    types = [types] if isinstance(types, str) else list(types)
    kind = own.get("f_divergence_type", "reverse_kl")
    coef = own.get("f_alpha_divergence_coef", 0.5)
    if kind != "reverse_kl" and not (kind == "alpha_divergence" and abs(coef - 1.0) < 1e-6):
        # an f-DPO score s(ρ) is nonlinear in each log-ratio: dL/dr = −s'(ρ_r)/s'(ρ_c)·dL/dc
        return "untied"
    if pairs > 1 and any(t in _ONE_PAIR_ONLY for t in types):
        return "untied"
    if all(t in _UNIT for t in types):
        return "unit"
    if all(t in _COUNT for t in types):
        return "count"
    return "untied"


def _dpo(c, r, ref, counts, nll, own):
    B = c.shape[0]
    return dpo_loss(c, r, ref[:B], ref[B:], chosen_counts=counts[:B], rejected_counts=counts[B:],
                    **own)


def _wpo_options(own: dict, sums: Tensor, counts_f: Tensor) -> dict:
    """DPO's front-door WPO options (use_weighting, log_sum_sq_probs [2B]: per-sequence sums
    over labelled tokens of log Σ_v π_v²) -> dpo_loss's (use_weighting, chosen/rejected
    aligned log-probs [B], detached; see wpo_aligned_logps)."""
    lss = own.get("log_sum_sq_probs")
    if not own.get("use_weighting", False):
        if lss is not None:
            raise ValueError("log_sum_sq_probs is WPO's input: it applies only with "
                             "use_weighting=True")
        return own
    S = sums.shape[0]
    if not isinstance(lss, Tensor) or tuple(lss.shape) != (S,):
        got = tuple(lss.shape) if isinstance(lss, Tensor) else lss
        raise ValueError(f"use_weighting=True needs log_sum_sq_probs of shape [2B] = ({S},): each "
                         f"sequence's sum over its labelled tokens of log Σ_v p_v² under the "
                         f"policy (preference_loss computes it); got {got}")
    aligned = wpo_aligned_logps(sums, lss.to(sums.device), counts_f)
    out = {k: v for k, v in own.items() if k != "log_sum_sq_probs"}
    out.update(chosen_aligned_logps=aligned[:S // 2], rejected_aligned_logps=aligned[S // 2:])
    return out


@dataclass(frozen=True)
class LossSpec:
    """name; options: its own keyword options; reference: reads reference log-probs; average:
    default reduction (per-token averages, else sums); paired: chosen/rejected pairs (KTO is
    unpaired); nll: has an NLL term on the chosen tokens; tie: (options, pairs) -> 'unit' |
    'count' | 'untied'; compute: (chosen [B], rejected [B], ref [2B] or None, counts [2B], nll,
    options) -> (loss, metrics); fn: the functional form (alignkit.losses)."""
    name: str
    options: tuple
    reference: bool
    average: bool
    paired: bool
    nll: bool
    tie: Callable
    compute: Callable
    fn: Callable


LOSSES = {s.name: s for s in (
    LossSpec("dpo", ("beta", "loss_type", "loss_weights", "label_smoothing", "discopop_tau",
                     "f_divergence_type", "f_alpha_divergence_coef", "use_weighting",
                     "log_sum_sq_probs", "ld_alpha"),
             reference=True, average=False, paired=True, nll=False, tie=_dpo_tie, compute=_dpo,
             fn=dpo_loss),
    LossSpec("simpo", ("beta", "gamma", "label_smoothing"), reference=False, average=True,
             paired=True, nll=False, tie=lambda own, pairs: "unit",
             compute=lambda c, r, ref, counts, nll, own: simpo_loss(c, r, **own), fn=simpo_loss),
    LossSpec("cpo", ("beta", "cpo_alpha", "loss_type", "label_smoothing", "simpo_gamma",
                     "alpha"), reference=False,
             average=True, paired=True, nll=True, tie=lambda own, pairs: "untied",
             compute=lambda c, r, ref, counts, nll, own: cpo_loss(c, r, nll=nll, **own),
             fn=cpo_loss),
    LossSpec("orpo", ("beta",), reference=False, average=True, paired=True, nll=True,
             tie=lambda own, pairs: "untied",
             compute=lambda c, r, ref, counts, nll, own: orpo_loss(c, r, nll=nll, **own),
             fn=orpo_loss),
    LossSpec("kto", ("beta", "loss_type", "desirable_weight", "undesirable_weight",
                     "kl_estimate"),
             reference=True, average=False, paired=False, nll=False,
             tie=lambda own, pairs: "untied", compute=None, fn=kto_loss),
)}
PAIRED = tuple(k for k, s in LOSSES.items() if s.paired)


def spec(loss: str) -> LossSpec:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[loss]


def default_average(loss: str, own: dict) -> bool:
    """A loss's reduction when the call gives no ``average``: its spec's, except CPO, which
    follows TRL 1.16's CPOTrainer (per-token averages for ipo, simpo and alphapo; sums for
    sigmoid and hinge)."""
    if loss == "cpo":
        return own.get("loss_type", "sigmoid") in ("ipo", "simpo", "alphapo")
    return LOSSES[loss].average


def paired_loss_on_logps(loss: str, logps, sums, counts_f, ref, own):
    """A paired loss on the 2B log-probs in its reduction (logps), their sums and token counts
    (the NLL term is the chosen tokens' token mean, TRL's cross-entropy)."""
    s = LOSSES[loss]
    B = logps.shape[0] // 2
    nll = -sums[:B].sum() / counts_f[:B].sum().clamp(min=1) if s.nll else None
    if loss == "dpo":
        if own.get("ld_alpha") is not None:
            raise ValueError("ld_alpha needs each token's log-prob (its place against the pair's "
                             "shorter response), not per-sequence sums: use preference_loss, or "
                             "alignkit.losses.ld.ld_sequence_logprobs and no ld_alpha here")
        own = {k: v for k, v in own.items() if k != "ld_alpha"}
        own = _wpo_options(own, sums, counts_f)
    return s.compute(logps[:B], logps[B:], ref, counts_f, nll, own)
