"""The trainer's objective. The paired losses run as ``alignkit.preference_loss`` inside the
model module (``Paired``: the fused engine, single pass included), and ``loss: sft`` as
``alignkit.sft_loss`` (``SFT``: label smoothing, z-loss, DFT as loss_options); ``compute_loss``
is the objective on per-sequence log-prob sums (KTO, and the tests' cross-checks);
``reward_objective`` is a reward model's, on its scores.

KTO's reference point z₀ (``loss_options.kl_estimate``): ``mismatched`` (default, as in the paper
and TRL) scores each prompt with the completion of a fixed other example (the next one in dataset
order), packed into the same forward as extra sequences; ``zero`` uses z₀ = 0 and skips them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from alignkit.losses import kto_loss, logprob_loss, sft_loss
from alignkit.losses.reward import reward_ranking_loss
from alignkit.losses.fused import split_options
from alignkit.losses.registry import LOSSES
from alignkit.ops.pass_budget import check_grad_mode

# the options of the losses the trainer runs outside the paired engine: KTO (the registry's), and
# two that score no preference
OWN_OPTIONS = {"kto": LOSSES["kto"].options, "reward": ("center_rewards_coefficient",),
               "sft": ("label_smoothing", "z_loss", "loss_type")}


def check_loss_options(loss: str, options: dict) -> None:
    """Names and values of a loss's options, checked by running the loss itself once on a dummy
    pair (or KTO example) of zeros: the same code and messages as a real call, before any model
    is built."""
    if loss in OWN_OPTIONS:
        bad = sorted(set(options) - set(OWN_OPTIONS[loss]))
        if bad:
            raise ValueError(f"option(s) {bad} do not apply to loss {loss!r}; it takes "
                             f"{', '.join(OWN_OPTIONS[loss]) or 'none'}")
    if loss == "reward":
        reward_ranking_loss(torch.zeros(1, 2), **options)
    if loss == "sft":         # sft_loss's own checks, on one dummy token
        sft_loss(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long),
                 **options)
    if loss in ("reward", "sft"):
        return
    if loss == "kto":
        if options.get("kl_estimate", "mismatched") not in ("mismatched", "zero"):
            raise ValueError("kl_estimate must be mismatched or zero, got "
                             f"{options['kl_estimate']!r}")
        if options.get("loss_type") == "apo_zero_unpaired" and \
                options.get("kl_estimate") == "mismatched":
            raise ValueError("kl_estimate 'mismatched' with loss_type 'apo_zero_unpaired': that "
                             "loss has no reference point, so the mismatched pairs would be "
                             "scored for nothing (leave kl_estimate out)")
        z = torch.zeros(1)
        kto_loss(z, z, torch.ones(1, dtype=torch.bool),
                 **{k: v for k, v in options.items() if k != "kl_estimate"})
        return
    own, common = split_options(loss, options)
    extra = sorted(set(common) - {"average", "grad_mode"})
    if extra:
        raise ValueError(f"option(s) {extra} are set by the trainer (backend: a config key; "
                         "softcap / temperature: from the model's config), not in loss_options")
    check_grad_mode(common.get("grad_mode", "auto"))
    options = {k: v for k, v in options.items() if k != "grad_mode"}
    if "average" in common and not isinstance(common["average"], bool):
        raise ValueError(f"average must be true or false, got {common['average']!r}")
    if options.get("ld_alpha") is not None:
        raise ValueError("ld_alpha is not served by the trainer: its reference log-probs are "
                         "plain per-sequence sums (cached), LD-DPO needs them desensitised; use "
                         "preference_loss in your loop, or TRL's DPOTrainer with patch_trainer")
    if "log_sum_sq_probs" in options:
        raise ValueError("log_sum_sq_probs is computed by the trainer's loss from the model "
                         "(use_weighting=True), not given in loss_options")
    z = torch.zeros(2)
    if options.get("use_weighting") is True:     # the trainer computes WPO's input
        options = {**options, "log_sum_sq_probs": z}
    logprob_loss(z, torch.ones(2, dtype=torch.long), loss=loss,
                 ref_logprobs=z if loss == "dpo" else None, **options)


@dataclass(frozen=True)
class Paired:
    """A paired loss as the model module runs it: alignkit.preference_loss(..., loss=loss,
    **options) on the response hidden states (the fused engine: recompute or single pass)."""
    loss: str
    options: dict


@dataclass(frozen=True)
class SFT:
    """``loss: sft`` as the model module runs it: alignkit.sft_loss(..., **options) on the
    response hidden states (the fused token pass). Metrics: ``nll`` (plain NLL) or ``sft`` (with
    options: the smoothed / z-loss / DFT loss), ``entropy``, ``mean_token_accuracy``,
    ``tokens``."""
    options: dict


def paired_objective(loss: str, options: dict):
    """The objective the model module runs for a config's loss (Paired, or SFT); None for KTO
    (unpaired: its loss runs on the per-sequence sums, compute_loss) and the reward model."""
    if loss == "sft":
        return SFT(dict(options))
    return Paired(loss, dict(options)) if loss in LOSSES and LOSSES[loss].paired else None


def ref_logprobs_of(loss: str, options: dict, ref: Optional[tuple], like: Tensor):
    """The reference log-probs a paired loss takes ([S] in its reduction), from the reference's
    (sums, counts); zeros for reference-free DPO (reference: none); None for the others."""
    if loss not in LOSSES or not LOSSES[loss].reference:
        return None
    if ref is None:
        return torch.zeros_like(like, dtype=torch.float32)
    rs, rc = ref
    return rs / rc.clamp(min=1).to(rs.dtype) if options.get("average") else rs


def kto_uses_kl(loss: str, options: dict) -> bool:
    """KTO scores the mismatched pairs for z₀; apo_zero_unpaired has no z₀ (TRL turns its
    calculate_KL off)."""
    return (loss == "kto" and options.get("loss_type", "kto") != "apo_zero_unpaired"
            and options.get("kl_estimate", "mismatched") == "mismatched")


def compute_loss(loss: str, options: dict, sums: Tensor, counts: Tensor,
                 ref: Optional[tuple], desirable: Optional[Tensor] = None):
    """sums/counts [S] from the policy; ref = (sums [S], counts [S]) or None (reference-free).
    Returns (loss, metrics)."""
    if loss == "sft":
        return sft_from_sums(sums, counts)
    if loss == "kto":
        opts = {k: v for k, v in options.items() if k != "kl_estimate"}
        b = desirable.shape[0]
        ref_sums = ref[0] if ref is not None else torch.zeros_like(sums)
        kw = {}
        if sums.shape[0] == 2 * b:
            kw = dict(policy_kl_logps=sums[b:], ref_kl_logps=ref_sums[b:])
        return kto_loss(sums[:b], ref_sums[:b], desirable, **opts, **kw)
    options = {k: v for k, v in options.items() if k != "grad_mode"}   # a fused-engine option
    return logprob_loss(sums, counts, loss=loss, ref_logprobs=ref_logprobs_of(loss, options, ref,
                                                                              sums), **options)


def sft_from_sums(sums: Tensor, counts: Tensor):
    """The response tokens' mean negative log-likelihood, −Σ log p / Σ tokens, over the
    micro-batch (as TRL's SFTTrainer averages over tokens), from per-sequence sums (the tests'
    cross-check of the trainer's SFT objective). Metrics: ``nll``, ``tokens``."""
    loss = -sums.sum() / counts.sum().clamp(min=1).to(sums.dtype)
    return loss, {"nll": loss.detach(), "tokens": counts.sum().detach().float()}


def reward_objective(scores: Tensor, examples, indices, options: dict):
    """A reward model's loss on a micro-batch: scores [S] in collate's response-major order ->
    the [b, K] table of each example's responses (best first) -> reward_ranking_loss, with each
    row's own response count and the rows' margins when the data has them."""
    ks = [len(examples[i].responses) for i in indices]
    b, K = len(ks), max(ks)
    table, pos = [[0] * K for _ in range(b)], 0
    for k in range(K):
        for e in range(b):
            if k < ks[e]:
                table[e][k] = pos
                pos += 1
    idx = torch.tensor(table, device=scores.device)
    margin = None
    if examples[indices[0]].margin is not None:
        margin = torch.tensor([examples[i].margin for i in indices], device=scores.device,
                              dtype=scores.dtype)
    return reward_ranking_loss(scores[idx], ks, margin=margin, **options)
