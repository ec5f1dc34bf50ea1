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
            loss_weights=None, label_smoothing=0.0, discopop_tau=0.05):
    """per_token_logps [2B, L-1] aligned with completion_mask[:, 1:]; returns (loss, metrics)."""
    from trl import DPOTrainer
    S, L = completion_mask.shape
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(S, L - 1),
                              mean_logits=torch.zeros(S, L - 1),
                              is_top1=torch.zeros(S, L - 1, dtype=torch.bool))
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Acc(), ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta,
        label_smoothing=label_smoothing, args=SimpleNamespace(discopop_tau=discopop_tau),
        use_weighting=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(S, L, dtype=torch.long), "attention_mask": torch.ones(S, L),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(me, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def trl_cpo(chosen, rejected, *, beta, loss_type, label_smoothing=0.0, simpo_gamma=0.5):
    from trl.experimental.cpo import CPOTrainer
    me = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         simpo_gamma=simpo_gamma, accelerator=_Acc())
    losses, cr, rr = CPOTrainer.cpo_loss(me, chosen, rejected)
    return losses, cr, rr


def trl_orpo(chosen, rejected, *, beta):
    from trl.experimental.orpo import ORPOTrainer
    me = SimpleNamespace(beta=beta, accelerator=_Acc())
    return ORPOTrainer.odds_ratio_loss(me, chosen, rejected)


def trl_kto(per_token_logps, completion_mask, labels, ref_logps, policy_kl, ref_kl, *, beta,
            desirable_weight=1.0, undesirable_weight=1.0):
    """KTOTrainer._compute_loss on given per-token log-probs [N, L-1]; returns (loss, metrics)."""
    from trl import KTOTrainer
    N, L = completion_mask.shape
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(N, L - 1),
                              mean_logits=torch.zeros(N, L - 1))
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Acc(), calculate_KL=True,
        _compute_kl_logps=lambda model, batch: policy_kl, precompute_ref_logps=True,
        loss_type="kto", beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    batch = {"input_ids": torch.zeros(N, L, dtype=torch.long), "attention_mask": torch.ones(N, L),
             "completion_mask": completion_mask, "label": labels, "ref_logps": ref_logps,
             "ref_KL_logps": ref_kl}
    loss = KTOTrainer._compute_loss(me, lambda **kw: outputs, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}
