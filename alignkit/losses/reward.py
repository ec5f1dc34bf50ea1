"""Reward-model losses (Bradley–Terry) on scalar rewards."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.options import check_pair_tensors


def reward_pairwise_loss(chosen_rewards: Tensor, rejected_rewards: Tensor,
                         margin: Optional[Tensor] = None):
    """Bradley–Terry: loss = −mean log σ(r_c − r_r − m)   (m: optional per-pair margin [B], as in
    Llama 2's reward model). Returns (loss, metrics) with ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``."""
    check_pair_tensors(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                       **({} if margin is None else {"margin": margin}))
    d = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(d if margin is None else d - margin).mean()
    dd = d.detach()
    return loss, {"rewards/chosen": chosen_rewards.detach().mean(),
                  "rewards/rejected": rejected_rewards.detach().mean(),
                  "rewards/accuracies": (dd > 0).float().mean(),
                  "rewards/margins": dd.mean()}


def reward_ranking_loss(rewards: Tensor):
    """K ranked responses per prompt, best first: rewards [P, K] (K ≥ 2).

        loss = −1/(P·C(K,2)) · Σ_p Σ_{i<j} log σ(r_{p,i} − r_{p,j})

    the mean over the C(K,2) ordered pairs of each prompt (InstructGPT, Ouyang et al. 2022).
    Metrics: ``rewards/accuracies`` (share of pairs ordered right), ``rewards/margins``."""
    if not isinstance(rewards, Tensor) or rewards.dim() != 2 or rewards.shape[1] < 2:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must have shape [P, K] with K >= 2 (best first), got {shape}")
    K = rewards.shape[1]
    i, j = torch.triu_indices(K, K, offset=1, device=rewards.device)
    d = rewards[:, i] - rewards[:, j]
    dd = d.detach()
    return -F.logsigmoid(d).mean(), {"rewards/accuracies": (dd > 0).float().mean(),
                                     "rewards/margins": dd.mean()}
