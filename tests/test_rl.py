"""alignkit.rl's PPO arithmetic against float64 closed forms and against TRL's PPOTrainer's
formulas (trl/experimental/ppo/ppo_trainer.py; TRL 1.16 as installed ships no PPOTrainer, so
tests/trl_oracle.py restates its steps in its own layout), on ragged right-padded masks."""
import math

import pytest
import torch

from alignkit.rl import gae, kl_penalized_rewards, masked_whiten, value_loss
from trl_oracle import trl_ppo_gae, trl_ppo_rewards, trl_value_loss

D = torch.float64


def _batch(seed, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 1, 3, T - 2, 4][:B])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g, dtype=D) * 3
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    scores = torch.randn(B, generator=g, dtype=D) * 2
    values = torch.randn(B, T, generator=g, dtype=D)
    return lp, ref, scores, values, mask, lengths


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalized_rewards(estimator):
    lp, ref, scores, _, mask, lengths = _batch(1)
    beta = 0.07
    r = kl_penalized_rewards(scores, lp, ref, mask, beta, estimator)
    d = ref - lp
    kl = {"k1": -d, "k2": 0.5 * d * d, "k3": d.exp() - d - 1}[estimator]
    want = torch.zeros_like(lp)
    for b in range(lp.shape[0]):
        for t in range(int(lengths[b])):
            want[b, t] = -beta * kl[b, t] + (scores[b] if t == lengths[b] - 1 else 0)
    torch.testing.assert_close(r, want, rtol=0, atol=1e-15)
    if estimator != "k2":                                # TRL's PPO has k1 and k3
        torch.testing.assert_close(r, trl_ppo_rewards(scores, lp, ref, mask, beta, estimator))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.5, 0.0)])
def test_gae_closed_form_and_trl(gamma, lam):
    _, _, _, values, mask, lengths = _batch(2)
    rewards = torch.randn(values.shape, generator=torch.Generator().manual_seed(5), dtype=D)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want = torch.zeros_like(values)
    for b in range(values.shape[0]):
        n = int(lengths[b])
        v = [float(values[b, t]) for t in range(n)] + [0.0]       # V after the last token = 0
        delta = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want[b, t] = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(mask, want + values, 0.0), rtol=0, atol=1e-12)
    if lam == 1.0:                                  # returns: the discounted reward-to-go
        for b in range(values.shape[0]):
            n = int(lengths[b])
            for t in range(n):
                g = sum(gamma ** k * float(rewards[b, t + k]) for k in range(n - t))
                assert ret[b, t].item() == pytest.approx(g, abs=1e-12)
    adv_w, ret_w = gae(rewards, values, mask, gamma, lam, whiten=True)
    t_adv, t_ret = trl_ppo_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(ret_w, t_ret)
    torch.testing.assert_close(adv_w, t_adv)
    sel = adv_w[mask]
    assert sel.mean().abs() < 1e-12 and sel.std().item() == pytest.approx(1.0, rel=1e-6)
    assert (adv_w[~mask] == 0).all()


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_and_its_gradient(clip):
    _, _, _, old, mask, _ = _batch(3)
    g = torch.Generator().manual_seed(9)
    v = (old + 0.4 * torch.randn(old.shape, generator=g, dtype=D)).requires_grad_()
    ret = old + torch.randn(old.shape, generator=g, dtype=D)
    loss = value_loss(v, old, ret, mask, clip)
    want = trl_value_loss(v, old, ret, mask, clip if clip is not None else math.inf)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-14)
    (gv,) = torch.autograd.grad(loss, v)
    (gw,) = torch.autograd.grad(want, v)
    torch.testing.assert_close(gv, gw)
    assert (gv[~mask] == 0).all() and gv[mask].abs().sum() > 0
    if clip is not None:                    # the clip binds somewhere, or the test proves nothing
        assert ((v - old).abs()[mask] > clip).any()


def test_whiten_matches_bessel_definition():
    x = torch.randn(3, 4, dtype=D)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    sel = x[m]
    want = (x - sel.mean()) / (sel.var(unbiased=True) + 1e-8).sqrt()
    torch.testing.assert_close(masked_whiten(x, m)[m], want[m])


def test_bad_input_is_named():
    lp, ref, scores, values, mask, _ = _batch(4)
    with pytest.raises(ValueError, match="mask: row 0 has a gap"):
        bad = mask.clone()
        bad[0, 2] = False
        gae(values, values, bad)
    with pytest.raises(ValueError, match="no response token"):
        empty = mask.clone()
        empty[1] = False
        kl_penalized_rewards(scores, lp, ref, empty, 0.1)
    with pytest.raises(ValueError, match=r"scores must be \[B\]"):
        kl_penalized_rewards(scores[:2], lp, ref, mask, 0.1)
    with pytest.raises(ValueError, match="estimator must be one of k1, k2, k3"):
        kl_penalized_rewards(scores, lp, ref, mask, 0.1, "k9")
    with pytest.raises(ValueError, match="beta must be"):
        kl_penalized_rewards(scores, lp, ref, mask, -1.0)
    with pytest.raises(ValueError, match="lam must be"):
        gae(values, values, mask, lam=1.5)
    with pytest.raises(ValueError, match="values must have shape"):
        gae(values, values[:, :3], mask)
    with pytest.raises(ValueError, match="clip must be"):
        value_loss(values, values, values, mask, clip=0.0)
    with pytest.raises(ValueError, match="mask must be bool or 0/1"):
        value_loss(values, values, values, mask.double() * 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64,
                                   torch.uint8])
def test_numeric_0_1_masks_act_as_the_bool_mask(dtype):
    """TRL and most users build masks as attention_mask.float(): gae, value_loss and
    masked_whiten take any 0/1 mask and give exactly what the bool mask gives."""
    lp, ref, scores, values, mask, _ = _batch(5)
    rewards = kl_penalized_rewards(scores, lp, ref, mask, 0.05)
    m = mask.to(dtype)
    for a, b in zip(gae(rewards, values, m, 0.99, 0.9, whiten=True),
                    gae(rewards, values, mask, 0.99, 0.9, whiten=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    v = values + 0.3
    assert value_loss(v, values, rewards, m).item() == value_loss(v, values, rewards, mask).item()
    torch.testing.assert_close(masked_whiten(values, m), masked_whiten(values, mask),
                               rtol=0, atol=0)
    torch.testing.assert_close(kl_penalized_rewards(scores, lp, ref, m, 0.05), rewards,
                               rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0.5, 2.0, float("nan"), -1.0])
def test_masks_with_other_values_are_refused_by_name(bad):
    lp, ref, scores, values, mask, _ = _batch(6)
    m = mask.double()
    m[0, 0] = bad
    for call in (lambda: gae(values, values, m), lambda: value_loss(values, values, values, m),
                 lambda: masked_whiten(values, m),
                 lambda: kl_penalized_rewards(scores, lp, ref, m, 0.1)):
        with pytest.raises(ValueError, match=r"^mask must be bool or 0/1 \(int or float\); got "
                                             r"the value"):
            call()
    with pytest.raises(ValueError, match="mask must be bool or 0/1"):
        masked_whiten(values, torch.complex(m, m))
