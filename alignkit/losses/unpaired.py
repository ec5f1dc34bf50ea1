"""KTO: unpaired preference loss on sequence log-probs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.losses.options import check_beta


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl: Optional[Tensor] = None, policy_kl_logps: Optional[Tensor] = None,
             ref_kl_logps: Optional[Tensor] = None):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306).

    With ρ = logπ(y) − logπ_ref(y) (summed log-probs [N]) and the reference point
    z₀ = max(0, mean(logπ(y') − logπ_ref(y'))) over mismatched pairs y' (detached):
        desirable y:    λ_D·(1 − σ(β(ρ − z₀)))
        undesirable y:  λ_U·(1 − σ(β(z₀ − ρ)))
    loss = mean over all N examples. Give z₀ as ``kl``, or the [M] ``policy_kl_logps`` and
    ``ref_kl_logps`` to estimate it; with neither, z₀ = 0.

    Metrics: ``rewards/chosen``, ``rewards/rejected`` (means of βρ over each group; 0 when a group is
    empty), ``logps/chosen``, ``logps/rejected``, ``kl``, ``count/chosen``, ``count/rejected``.
    """
    check_beta(beta)
    for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps),
                    ("desirable", desirable)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape != policy_logps.shape:
            raise ValueError(f"{name} must be a 1-D tensor of shape {tuple(policy_logps.shape)}")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError("desirable_weight and undesirable_weight must be > 0")
    if kl is not None and (policy_kl_logps is not None or ref_kl_logps is not None):
        raise ValueError("give either kl or policy_kl_logps + ref_kl_logps, not both")
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("policy_kl_logps and ref_kl_logps go together")
    if policy_kl_logps is not None:
        kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    elif kl is None:
        kl = policy_logps.new_zeros(())
    rho = policy_logps - ref_logps
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (rho - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - rho))))
    rewards = beta * rho.detach()
    d = desirable.float()
    n_d, n_u = d.sum(), (1 - d).sum()
    metrics = {
        "rewards/chosen": (rewards * d).sum() / n_d.clamp(min=1),
        "rewards/rejected": (rewards * (1 - d)).sum() / n_u.clamp(min=1),
        "logps/chosen": (policy_logps.detach() * d).sum() / n_d.clamp(min=1),
        "logps/rejected": (policy_logps.detach() * (1 - d)).sum() / n_u.clamp(min=1),
        "kl": kl.detach(),
        "count/chosen": n_d,
        "count/rejected": n_u,
    }
    return losses.mean(), metrics
