"""PPO's advantage arithmetic for RLHF (InstructGPT, Ouyang et al. 2022, arXiv:2203.02155), on
right-padded responses: tensors [B, T] with ``mask`` [B, T] true on each row's response tokens, a
run of ones then padding. A mask is bool or numbers that are all 0 or 1 (int or float, as
``attention_mask.float()``); any other value is refused naming the argument.

    kl_penalized_rewards   R_t = −β·KL_t  (+ r(x, y) on the last response token)
    gae                    δ_t = R_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1}
                           (Schulman et al. 2016, arXiv:1506.02438), V after the last token = 0
    value_loss             ½·mean_t max((V − G)², (clip(V, V_old ± c) − G)²)

These are TRL's PPOTrainer formulas (trl/experimental/ppo/ppo_trainer.py; tests/test_rl.py checks
them against its code), with one difference of layout: TRL adds the score one position after the
last token and keeps that position's value; here the score sits on the last response token, where
InstructGPT puts it, and nothing outside the mask is read.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from alignkit.losses.options import check_number
from alignkit.losses.policy import KL_ESTIMATORS, kl_estimate


def _float(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def check_binary_mask(mask, like: Tensor, name: str = "mask") -> Tensor:
    """mask [B, T] of like's shape, bool or numbers that are all 0 or 1 (integer or float, e.g.
    ``attention_mask.float()``, as TRL builds its masks); returned as bool. Any other value (0.5,
    2, NaN, a complex number) is refused naming the argument, before any work."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(like.shape) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be [B, T] like the per-token tensors {tuple(like.shape)}; "
                         f"got {shape}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{name} must be bool or 0/1 (int or float), got dtype {mask.dtype}")
    bad = (mask != 0) & (mask != 1)                      # NaN is neither
    if bad.any():
        v = mask[bad].flatten()[0].item()
        raise ValueError(f"{name} must be bool or 0/1 (int or float); got the value "
                         f"{v!r} ({int(bad.sum())} entries are neither 0 nor 1)")
    return mask != 0


def check_response_mask(mask, like: Tensor, name: str = "mask", need_token: bool = False) -> Tensor:
    """mask [B, T] (bool, or int / float 0/1) of like's shape, each row a run of ones then
    zeros; returned as bool."""
    mask = check_binary_mask(mask, like, name)
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        bad = int((mask[:, 1:] & ~mask[:, :-1]).any(1).nonzero()[0])
        raise ValueError(f"{name}: row {bad} has a gap; each row must be its response tokens "
                         "first, then padding (right-padded)")
    if need_token and not mask.any(1).all():
        bad = int((~mask.any(1)).nonzero()[0])
        raise ValueError(f"{name}: row {bad} has no response token to put its score on")
    return mask


def _check_same(name: str, t, like: Tensor):
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(like.shape):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {tuple(like.shape)}; got {shape}")


def last_token_index(mask: Tensor) -> Tensor:
    """[B]: the index of each row's last response token (mask right-padded, ≥ 1 token a row)."""
    return mask.sum(1) - 1


def kl_penalized_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         beta: float, estimator: str = "k1") -> Tensor:
    """Per-token rewards [B, T] of sampled responses (InstructGPT's PPO reward):

        R_t = −β·KL_t + [t = last response token]·r(x, y),   0 outside the mask,

    with KL_t = kl_estimate(logprobs, ref_logprobs, estimator): k1 = log π − log π_ref (the
    InstructGPT/TRL default), k2 = ½(log π − log π_ref)², k3 = e^{ref−lp} − (ref−lp) − 1
    (Schulman 2020). scores [B]: the reward model's score of each response; logprobs /
    ref_logprobs [B, T]: the policy's and the reference's log-probs of the sampled tokens."""
    check_number("beta", beta, low=0)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    _check_same("ref_logprobs", ref_logprobs, logprobs)
    mask = check_response_mask(mask, logprobs, need_token=True)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (logprobs.shape[0],):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be [B] = ({logprobs.shape[0]},); got {shape}")
    dt = _float(logprobs)
    kl = kl_estimate(logprobs.detach().to(dt), ref_logprobs.detach().to(dt), estimator)
    rewards = torch.where(mask, -beta * kl, torch.zeros((), dtype=dt, device=kl.device))
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, last_token_index(mask)), scores.detach().to(dt),
                             accumulate=True)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x − mean)/sqrt(var + 1e-8) over the masked entries, var with Bessel's correction (TRL's
    masked_whiten); shift_mean=False adds the mean back. x [B, T]; mask [B, T], bool or 0/1 (int
    or float; any pattern, not only right-padded)."""
    mask = check_binary_mask(mask, x)
    n = mask.sum()
    if int(n) < 2:
        raise ValueError("whitening needs at least 2 response tokens in the batch")
    m = mask.to(x.dtype)
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n * (n / (n - 1))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95,
        whiten: bool = False) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response tokens:

        δ_t = R_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   G_t = A_t + V_t,

    with V_{t+1} = 0 and A_{t+1} = 0 after a row's last response token (the episode ends there,
    as in TRL's PPO). rewards / values / mask [B, T]. Returns (advantages, returns) [B, T], zero
    outside the mask; whiten=True whitens the advantages over the masked tokens (returns are
    taken before whitening). Detached: both are regression and policy targets."""
    check_number("gamma", gamma, low=0, high=1)
    check_number("lam", lam, low=0, high=1)
    if not isinstance(whiten, bool):
        raise TypeError(f"whiten must be a bool, got {whiten!r}")
    _check_same("values", values, rewards)
    mask = check_response_mask(mask, rewards)
    dt = torch.promote_types(_float(rewards), values.dtype)
    zero = torch.zeros((), dtype=dt, device=rewards.device)
    r = torch.where(mask, rewards.detach().to(dt), zero)
    v = torch.where(mask, values.detach().to(dt), zero)
    T = r.shape[1]
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        nxt = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        last = r[:, t] + gamma * nxt - v[:, t] + gamma * lam * last
        last = torch.where(mask[:, t], last, zero)
        adv[:, t] = last
    returns = adv + v
    if whiten:
        adv = torch.where(mask, masked_whiten(adv, mask), zero)
    return adv, returns


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: Optional[float] = 0.2) -> Tensor:
    """The clipped value loss of PPO (as in OpenAI's baselines and TRL):

        ½ · mean_{t ∈ mask} max((V_t − G_t)², (clip(V_t, V_old,t − c, V_old,t + c) − G_t)²)

    values [B, T] (differentiable), old_values [B, T] (the rollout's), returns [B, T] (gae's);
    clip=None: the plain ½·MSE. Returns a 0-dim loss."""
    _check_same("old_values", old_values, values)
    _check_same("returns", returns, values)
    mask = check_response_mask(mask, values)
    if clip is not None:
        check_number("clip", clip, low=0, low_open=True)
    dt = _float(values)
    v, g = values.to(dt), returns.detach().to(dt)
    loss = (v - g) ** 2
    if clip is not None:
        old = old_values.detach().to(dt)
        vc = torch.maximum(torch.minimum(v, old + clip), old - clip)
        loss = torch.maximum(loss, (vc - g) ** 2)
    m = mask.to(dt)
    return 0.5 * (loss * m).sum() / m.sum().clamp(min=1)
