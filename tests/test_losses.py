"""Fused preference losses from hidden states against a float64 reference, layouts, edge cases."""
import pytest
import torch

import alignkit
from alignkit.losses import (DPO_LOSS_TYPES, DPOLoss, kto_loss, preference_loss,
                             reward_pairwise_loss, reward_ranking_loss)
from alignkit.testing.oracle import reference_sequence_logprobs
from conftest import assert_oracle, make_inputs

B, T, H, V = 2, 37, 33, 1000


def _pair_inputs(seed, dtype=torch.float32):
    h, W, _, y = make_inputs((2 * B, T), H, V, dtype=dtype, seed=seed)
    y[:, :9] = -100  # prompts
    return h, W, y


def _grads(fn, h, W):
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    loss, metrics = fn(h, W)
    loss.backward()
    return loss.detach(), h.grad, W.grad, metrics


def _ref_loss(loss, opts, ref_lp):
    """float64 reference: oracle sequence log-probs + the same functional loss."""
    from alignkit.losses.fused import preference_loss as _  # noqa: F401  (same option split)
    from alignkit.losses import cpo_loss, dpo_loss, orpo_loss, simpo_loss

    def fn(h, W, y):
        sums, counts = reference_sequence_logprobs(h, W, y)
        counts = counts.to(sums.dtype)
        avg = sums / counts.clamp(min=1)
        if loss == "dpo":
            return dpo_loss(sums[:B], sums[B:], ref_lp[:B].to(h.dtype), ref_lp[B:].to(h.dtype),
                            chosen_counts=counts[:B], rejected_counts=counts[B:], **opts)
        if loss == "simpo":
            return simpo_loss(avg[:B], avg[B:], **opts)
        nll = -sums[:B].sum() / counts[:B].sum().clamp(min=1)
        if loss == "cpo" and opts.get("loss_type", "sigmoid") in ("sigmoid", "hinge"):
            return cpo_loss(sums[:B], sums[B:], nll=nll, **opts)   # TRL's reduction: sums
        f = cpo_loss if loss == "cpo" else orpo_loss
        return f(avg[:B], avg[B:], nll=nll, **opts)
    return fn


CASES = [("dpo", dict(loss_type=t, **({"label_smoothing": 0.1} if t in ("cdpo", "exo_pair", "robust", "aot", "aot_unpaired") else {})))
         for t in DPO_LOSS_TYPES]
CASES += [("dpo", dict(loss_type=["cdpo", "sft"], loss_weights=[1.0, 0.3], label_smoothing=0.05)),
          ("simpo", dict(beta=2.0, gamma=0.7)), ("simpo", dict(label_smoothing=0.1)),
          ("cpo", dict(cpo_alpha=0.7)), ("cpo", dict(loss_type="hinge")), ("cpo", dict(loss_type="ipo")),
          ("orpo", dict(beta=0.2))]


@pytest.mark.parametrize("loss,opts", CASES, ids=[f"{l}-{o}" for l, o in CASES])
def test_fused_against_float64(loss, opts):
    h, W, y = _pair_inputs(seed=len(str(opts)))
    ref_lp = -torch.rand(2 * B, dtype=torch.float64) * 20 - 60
    kw = dict(ref_logprobs=ref_lp.float()) if loss == "dpo" else {}
    ours = _grads(lambda h_, W_: preference_loss(h_, W_, y, loss=loss, **kw, **opts), h, W)
    ref_fn = _ref_loss(loss, opts, ref_lp)
    oracle = _grads(lambda h_, W_: ref_fn(h_, W_, y), h.double(), W.double())
    naive = _grads(lambda h_, W_: ref_fn(h_, W_, y), h, W)
    for name, a, o, n in zip(("loss", "grad_hidden", "grad_weight"), ours, oracle, naive):
        assert_oracle(name, a, o, n, factor=8.0)
    assert set(oracle[3]) <= set(ours[3])
    for k, v in ours[3].items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k


def test_packed_equals_padded():
    h, W, y = _pair_inputs(seed=1)
    lengths = [37, 20, 31, 15]
    y_pad = y.clone()
    for i, n in enumerate(lengths):
        y_pad[i, n:] = -100
    ph = torch.cat([h[i, :n] for i, n in enumerate(lengths)]).detach()
    py = torch.cat([y[i, :n] for i, n in enumerate(lengths)])
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    ref_lp = -torch.rand(2 * B) * 20 - 60
    for loss, kw in (("dpo", dict(ref_logprobs=ref_lp)), ("simpo", {}), ("orpo", {})):
        a, ma = preference_loss(h, W, y_pad, loss=loss, **kw)
        b, mb = preference_loss(ph, W, py, loss=loss, segment_ids=seg, **kw)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        for k in ma:
            assert torch.allclose(ma[k], mb[k], rtol=1e-5, atol=1e-6), k
        ga = torch.autograd.grad(a, W)[0]
        gb = torch.autograd.grad(b, W)[0]
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("average", [False, True])
def test_precomputed_reference_equals_ref_hidden(average):
    h, W, y = _pair_inputs(seed=2)
    ref_h = (h.detach() + 0.1 * torch.randn_like(h)).requires_grad_()
    ref_W = W.detach() * 0.9
    a, ma = preference_loss(h, W, y, ref_hidden=ref_h, ref_weight=ref_W, average=average)
    sums, counts = alignkit.sequence_logprobs(ref_h.detach(), ref_W, y, average=average)
    b, mb = preference_loss(h, W, y, ref_logprobs=sums, average=average)
    assert torch.equal(a, b)
    assert ref_h.grad is None  # the reference is computed without gradients
    for k in ma:
        assert torch.equal(ma[k], mb[k])


def test_fully_masked_response_is_finite():
    h, W, y = _pair_inputs(seed=3)
    y[1] = -100  # chosen of pair 1
    y[3] = -100  # rejected of pair 1
    for loss, kw in (("dpo", dict(ref_logprobs=torch.zeros(2 * B), loss_type=["ipo", "sft"])),
                     ("simpo", {}), ("cpo", {}), ("orpo", {})):
        h.grad = W.grad = None
        out, m = preference_loss(h, W, y, loss=loss, **kw)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()
        assert all(torch.isfinite(v) for v in m.values())
        assert torch.all(h.grad[1] == 0) and torch.all(h.grad[3] == 0)


def test_module_form_matches_functional():
    h, W, y = _pair_inputs(seed=4)
    ref_lp = -torch.rand(2 * B) * 20 - 60
    a, _ = DPOLoss(beta=0.3, loss_type="hinge")(h, W, y, ref_logprobs=ref_lp)
    b, _ = preference_loss(h, W, y, loss="dpo", beta=0.3, loss_type="hinge", ref_logprobs=ref_lp)
    assert torch.equal(a, b)


def test_bad_inputs():
    h, W, y = _pair_inputs(seed=5)
    ref_lp = torch.zeros(2 * B)
    with pytest.raises(ValueError, match=r"even number of sequences.*got 3 rows"):
        preference_loss(h[:3], W, y[:3], ref_logprobs=torch.zeros(3))
    with pytest.raises(ValueError, match=r"even number of sequences.*got 3 segments"):
        preference_loss(h.reshape(-1, H)[:30], W, y.reshape(-1)[:30],
                        segment_ids=torch.tensor([0] * 10 + [1] * 10 + [2] * 10), ref_logprobs=ref_lp)
    with pytest.raises(ValueError, match=r"ref_logprobs must have shape \[2B\] = \(4,\)"):
        preference_loss(h, W, y, ref_logprobs=torch.zeros(3))
    with pytest.raises(ValueError, match=r"unknown loss 'dpop'; valid: dpo, simpo, cpo, orpo"):
        preference_loss(h, W, y, loss="dpop")
    with pytest.raises(ValueError, match=r"unknown DPO loss_type 'sigmod'; valid: sigmoid, ipo"):
        preference_loss(h, W, y, ref_logprobs=ref_lp, loss_type="sigmod")
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0"):
        preference_loss(h, W, y, ref_logprobs=ref_lp, beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        preference_loss(h, W, y, ref_logprobs=ref_lp, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 has no effect on loss_type \['hinge'\]"):
        preference_loss(h, W, y, ref_logprobs=ref_lp, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"option\(s\) \['gamma'\] do not apply to loss 'dpo'"):
        preference_loss(h, W, y, ref_logprobs=ref_lp, gamma=1.0)
    with pytest.raises(ValueError, match=r"option\(s\) \['gama'\] do not apply to loss 'simpo'"):
        DPOLoss.__mro__[1]("simpo", gama=1.0)
    with pytest.raises(ValueError, match=r"reference-free"):
        preference_loss(h, W, y, loss="simpo", ref_logprobs=ref_lp)
    with pytest.raises(ValueError, match=r"DPO needs a reference"):
        preference_loss(h, W, y)
    with pytest.raises(ValueError, match=r"discopop_tau applies only"):
        preference_loss(h, W, y, ref_logprobs=ref_lp, discopop_tau=0.1)
    with pytest.raises(ValueError, match=r"loss_weights must have one weight per loss_type"):
        preference_loss(h, W, y, ref_logprobs=ref_lp, loss_type=["sigmoid", "sft"], loss_weights=[1.0])


def test_kto_loss():
    g = torch.Generator().manual_seed(7)
    lp = (-torch.rand(6, generator=g, dtype=torch.float64) * 30).requires_grad_()
    ref = -torch.rand(6, generator=g, dtype=torch.float64) * 30
    des = torch.tensor([True, False, True, True, False, False])
    pkl, rkl = -torch.rand(6, generator=g, dtype=torch.float64) * 30, -torch.rand(6, generator=g, dtype=torch.float64) * 30
    loss, m = kto_loss(lp, ref, des, beta=0.2, desirable_weight=1.5, undesirable_weight=0.7,
                       policy_kl_logps=pkl, ref_kl_logps=rkl)
    kl = (pkl - rkl).mean().clamp(min=0)
    rho = lp - ref
    want = torch.cat([1.5 * (1 - torch.sigmoid(0.2 * (rho[des] - kl))),
                      0.7 * (1 - torch.sigmoid(0.2 * (kl - rho[~des])))]).mean()
    assert torch.allclose(loss, want, rtol=1e-12)
    assert torch.allclose(m["rewards/chosen"], (0.2 * rho[des]).mean().detach())
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    # one group empty: defined metrics, no NaN
    _, m2 = kto_loss(lp.detach(), ref, torch.ones(6, dtype=torch.bool))
    assert all(torch.isfinite(v) for v in m2.values())


def test_reward_losses():
    g = torch.Generator().manual_seed(8)
    c, r = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    loss, m = reward_pairwise_loss(c, r, margin=torch.full((5,), 0.5, dtype=torch.float64))
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(c - r - 0.5).mean())
    assert m["rewards/accuracies"].item() == pytest.approx((c > r).double().mean().item())
    rw = torch.randn(3, 4, generator=g, dtype=torch.float64)
    loss, _ = reward_ranking_loss(rw)
    pairs = [-torch.nn.functional.logsigmoid(rw[p, i] - rw[p, j])
             for p in range(3) for i in range(4) for j in range(i + 1, 4)]
    assert torch.allclose(loss, torch.stack(pairs).mean())
    with pytest.raises(ValueError, match=r"rewards must have shape \[P, K\] with K >= 2"):
        reward_ranking_loss(torch.randn(3))
