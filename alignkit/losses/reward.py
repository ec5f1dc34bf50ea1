"""Reward-model losses (Bradley–Terry) on scalar rewards: pairs, and K ranked responses."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.options import check_number, check_pair_tensors


def reward_pairwise_loss(chosen_rewards: Tensor, rejected_rewards: Tensor,
                         margin: Optional[Tensor] = None):
    """Bradley–Terry: loss = −mean log σ(r_c − r_r − m)   (m: optional per-pair margin [B], as in
    Llama 2's reward model). Returns (loss, metrics) with ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``rewards/mean``: reward_ranking_loss with K=2."""
    check_pair_tensors(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                       **({} if margin is None else {"margin": margin}))
    return reward_ranking_loss(torch.stack([chosen_rewards, rejected_rewards], 1), margin=margin)


def reward_ranking_loss(rewards: Tensor, num_responses: Union[Tensor, Sequence[int], None] = None,
                        margin: Optional[Tensor] = None, center_rewards_coefficient: float = 0.0):
    """K ranked responses per prompt, best first: rewards [P, K] (K ≥ 2).

        loss = −1/P · Σ_p 1/C(K_p,2) · Σ_{i<j<K_p} log σ(r_{p,i} − r_{p,j} − m_p)
               + c · 1/P · Σ_p (Σ_{k<K_p} r_{p,k})²

    the mean over each prompt's C(K_p,2) ordered pairs, then over prompts (InstructGPT, Ouyang et
    al. 2022, which counts a prompt's comparisons as one batch element so that prompts with many
    responses do not dominate). num_responses [P] (default K for every row): row p holds K_p ≥ 2
    responses and entries past K_p are padding, never read. margin [P] (optional, Llama 2's
    margin, Touvron et al. 2023): subtracted from each of prompt p's differences. c
    (center_rewards_coefficient, Eisenstein et al. 2023, TRL's RewardTrainer for pairs) pulls each
    prompt's rewards to a zero sum.

    Metrics (detached, 0-dim): ``rewards/accuracies`` and ``rewards/margins`` (the share of pairs
    ordered right and the mean difference, weighted as the loss), ``rewards/chosen`` and
    ``rewards/rejected`` (the mean reward of each prompt's best and worst response) and
    ``rewards/mean`` (the mean reward of all responses)."""
    if not isinstance(rewards, Tensor) or rewards.dim() != 2 or rewards.shape[1] < 2:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must have shape [P, K] with K >= 2 (best first), got {shape}")
    P, K = rewards.shape
    dev = rewards.device
    if num_responses is None:
        n = torch.full((P,), K, device=dev)
    else:
        # checked where it was given (the trainer's list: on the host, no device sync)
        n = torch.as_tensor(num_responses)
        if n.shape != (P,) or n.is_floating_point() or bool(((n < 2) | (n > K)).any()):
            raise ValueError(f"num_responses must be [P] = ({P},) integers in [2, K={K}]; got "
                             f"{n.tolist() if n.numel() <= 16 else tuple(n.shape)}")
        n = n.to(dev)
    if margin is not None:
        check_pair_tensors(margin=margin, **{"rewards[:, 0]": rewards[:, 0]})
    check_number("center_rewards_coefficient", center_rewards_coefficient, low=0)
    valid = torch.arange(K, device=dev)[None, :] < n[:, None]                   # [P, K]
    r = torch.where(valid, rewards, torch.zeros((), dtype=rewards.dtype, device=dev))
    i, j = torch.triu_indices(K, K, offset=1, device=dev)
    d = r[:, i] - r[:, j]                                                        # [P, C(K,2)]
    pairs = (n * (n - 1) // 2).to(rewards.dtype)
    w = valid[:, j].to(rewards.dtype) / (pairs[:, None] * P)                     # j < K_p ⇒ i too
    z = d if margin is None else d - margin[:, None].to(d.dtype)
    loss = -(w * F.logsigmoid(z)).sum()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (r.sum(1) ** 2).mean()
    dd, rd = d.detach(), r.detach()
    rows = torch.arange(P, device=dev)
    return loss, {"rewards/accuracies": (w * (dd > 0).to(w.dtype)).sum(),
                  "rewards/margins": (w * dd).sum(),
                  "rewards/chosen": rd[:, 0].mean(),
                  "rewards/rejected": rd[rows, n - 1].mean(),
                  "rewards/mean": rd.sum() / valid.sum()}
