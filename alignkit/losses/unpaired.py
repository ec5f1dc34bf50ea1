"""KTO: unpaired preference loss on sequence log-probs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.losses.options import check_beta, check_number

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl: Optional[Tensor] = None, policy_kl_logps: Optional[Tensor] = None,
             ref_kl_logps: Optional[Tensor] = None, loss_type: str = "kto"):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306), and TRL 1.16's
    ``loss_type="apo_zero_unpaired"`` (APO-zero, D'Oosterlinck et al. 2024, arXiv:2408.06266,
    Eq. 7, unpaired): desirable λ_D·(1 − σ(βρ)), undesirable λ_U·σ(βρ), no reference point (so
    ``kl`` / ``policy_kl_logps`` are refused with it; metric ``kl`` is 0).

    With ρ = logπ(y) − logπ_ref(y) (summed log-probs [N]) and the reference point
    z₀ = max(0, mean(logπ(y') − logπ_ref(y'))) over mismatched pairs y' (detached):
        desirable y:    λ_D·(1 − σ(β(ρ − z₀)))
        undesirable y:  λ_U·(1 − σ(β(z₀ − ρ)))
    loss = mean over all N examples (0.0 for N = 0). Give z₀ as ``kl`` (a number >= 0 or a 0-dim
    tensor), or the [M] ``policy_kl_logps`` and ``ref_kl_logps`` to estimate it (z₀ = 0 for
    M = 0); with neither, z₀ = 0.

    Metrics: ``rewards/chosen``, ``rewards/rejected`` (means of βρ over each group; 0 when a group is
    empty), ``logps/chosen``, ``logps/rejected``, ``kl``, ``count/chosen``, ``count/rejected``.
    """
    check_beta(beta)
    if not isinstance(loss_type, str) or loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; valid: {', '.join(KTO_LOSS_TYPES)}")
    if loss_type == "apo_zero_unpaired" and (kl is not None or policy_kl_logps is not None
                                             or ref_kl_logps is not None):
        raise ValueError("loss_type 'apo_zero_unpaired' has no reference point: kl / "
                         "policy_kl_logps / ref_kl_logps would be ignored, so they are refused")
    for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps),
                    ("desirable", desirable)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape != policy_logps.shape:
            raise ValueError(f"{name} must be a 1-D tensor of shape "
                             f"{tuple(getattr(policy_logps, 'shape', ()))}")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    check_number("desirable_weight", desirable_weight, low=0, low_open=True)
    check_number("undesirable_weight", undesirable_weight, low=0, low_open=True)
    if kl is not None and (policy_kl_logps is not None or ref_kl_logps is not None):
        raise ValueError("give either kl or policy_kl_logps + ref_kl_logps, not both")
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("policy_kl_logps and ref_kl_logps go together")
    if policy_kl_logps is not None:
        for name, t in (("policy_kl_logps", policy_kl_logps), ("ref_kl_logps", ref_kl_logps)):
            if not isinstance(t, Tensor) or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor [M], got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if policy_kl_logps.shape != ref_kl_logps.shape:
            raise ValueError(f"ref_kl_logps must have the shape of policy_kl_logps "
                             f"{tuple(policy_kl_logps.shape)}, got {tuple(ref_kl_logps.shape)}")
        # an empty KL batch gives no estimate: z0 = 0, as with neither given
        kl = ((policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
              if policy_kl_logps.numel() else policy_logps.new_zeros(()))
    elif kl is None:
        kl = policy_logps.new_zeros(())
    elif isinstance(kl, Tensor):
        if kl.numel() != 1:
            raise ValueError(f"kl must be a scalar (0-dim tensor or number), got shape "
                             f"{tuple(kl.shape)}")
        kl = kl.detach().reshape(()).to(policy_logps.dtype)
    else:
        check_number("kl", kl, low=0)
        kl = policy_logps.new_tensor(float(kl))
    rho = policy_logps - ref_logps
    # apo_zero_unpaired: kl is 0 here, and 1 − σ(−βρ) = σ(βρ)
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
    # an empty batch has no examples to average: loss 0 (still attached to the graph), not NaN
    loss = losses.mean() if losses.numel() else policy_logps.sum() * 0.0
    return loss, metrics
