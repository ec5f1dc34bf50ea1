"""alignkit.policy_loss: the terms and normalisations against TRL 1.16's GRPOTrainer._compute_loss
on the same log-probs (every loss_type, both importance-sampling levels, the KL penalty, the
entropy bonus), ppo and the k1/k2 estimators against their formulas, and the fused path from
hidden states against a float64 oracle from full logits (loss and every gradient)."""
import pytest
import torch

import alignkit
from alignkit.losses.policy import policy_loss_from_logprobs
from alignkit.testing.oracle import reference_linear_token_logprobs

trl = pytest.importorskip("trl")
from trl_oracle import assert_matches_trl, trl_grpo  # noqa: E402

B, T = 5, 9


def batch(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ent = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = lp.detach() + 0.3 * scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    mask[4] = 0                                   # a fully masked completion
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[2] = 0.0                                  # an advantage of zero
    return lp, ent, old, ref, mask, adv


def ours(lp, ent, old, ref, mask, adv, **kw):
    """policy_loss's loss half on the [B, T] log-probs (what it runs after the op)."""
    labels = torch.where(mask.bool(), 0, -100)
    return policy_loss_from_logprobs(lp, ent, labels, advantages=adv, old_logprobs=old,
                                     ref_logprobs=ref, **kw)


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo", epsilon_high=0.28),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dapo", epsilon_high=0.28, delta=1.5),
    dict(loss_type="dapo", num_items=40),
    dict(loss_type="cispo", epsilon_high=1.2),
    dict(loss_type="sapo"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="grpo", importance_sampling_level="sequence"),          # GSPO
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", beta=0.1, entropy_coef=0.01),
    dict(loss_type="sapo", entropy_coef=0.05, beta=0.02),
]


@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_trl_grpo_compute_loss(case, on_policy):
    lp, ent, old, ref, mask, adv = batch(seed=len(str(case)))
    old = None if on_policy else old
    beta = case.get("beta", 0.0)
    kw = dict(case)
    if beta:
        kw["kl_importance_weight"] = True          # TRL's default use_bias_correction_kl
    want, want_m = trl_grpo(
        lp, ent, mask, adv, loss_type=case["loss_type"], old_per_token_logps=old,
        ref_per_token_logps=ref if beta else None, beta=beta,
        importance_sampling_level=case.get("importance_sampling_level", "token"),
        epsilon_high=case.get("epsilon_high"), delta=case.get("delta"),
        entropy_coef=case.get("entropy_coef", 0.0), num_items_in_batch=case.get("num_items"))
    gw = torch.autograd.grad(want, (lp, ent), allow_unused=True)
    got, got_m = ours(lp, ent, old, ref if beta else None, mask, adv, **kw)
    go = torch.autograd.grad(got, (lp, ent), allow_unused=True)
    assert_matches_trl(got, got_m, go, want, want_m, gw, mask)
    expected = {"entropy"} | ({"kl"} if beta else set())
    if case["loss_type"] == "cispo":
        expected.add("cispo_clip_ratio")
    elif case["loss_type"] != "sapo":
        expected |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                     "clip_ratio/low_min", "clip_ratio/high_max"}
    assert expected <= set(got_m) and expected <= set(want_m), (set(got_m), set(want_m))


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_ppo_and_the_kl_estimators_against_their_formulas(kl_estimator):
    lp, ent, old, ref, mask, _ = batch(seed=3)
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)          # per-token advantages
    got, m = ours(lp, ent, old, ref, mask, adv, loss_type="ppo", beta=0.1,
                  kl_estimator=kl_estimator, epsilon_high=0.3)
    rho = torch.exp(lp - old)
    surr = -torch.minimum(rho * adv, rho.clamp(0.8, 1.3) * adv)
    d = ref - lp
    k = {"k1": lp - ref, "k2": 0.5 * d ** 2, "k3": torch.exp(d) - d - 1}[kl_estimator]
    k = k * rho                     # kl_importance_weight defaults to True (TRL's default)
    want = ((surr + 0.1 * k) * mask).sum() / mask.sum()                  # token mean
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gg, gw = torch.autograd.grad(got, lp)[0].reshape(B, T), torch.autograd.grad(want, lp)[0]
    torch.testing.assert_close(gg * mask, gw * mask, rtol=1e-10, atol=1e-12)
    assert m["kl"].item() == pytest.approx(((k * mask).sum() / mask.sum()).item())


def _inputs(S=4, Tn=11, H=24, V=700, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, Tn, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 3 / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (S, Tn), generator=g)
    y[:, :3] = -100                                # prompt
    y[1, -4:] = -100                               # padding
    y[2] = -100                                    # a fully masked completion
    return h, W, b, y, g


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kw", [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.04, kl_estimator="k2"),
    dict(loss_type="ppo", entropy_coef=0.02, beta=0.1, kl_estimator="k1"),
    dict(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.01),
    # sequence level (GSPO), no entropy bonus: every token deferred; 8-row tiles and a keep
    # budget of 12 rows, so 12 tokens are kept and the rest scored, then formed again
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
         kl_importance_weight=True, tiles=alignkit.TileOptions(single_pass_bytes=8 * 700 * 4,
                                                               keep_bytes=4 * 700 * 4)),
    dict(loss_type="luspo", importance_sampling_level="sequence", delta=1.5),  # all kept
    dict(loss_type="cispo", epsilon_high=2.0, softcap=4.0, temperature=0.7),
], ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items() if a != "tiles"))
@pytest.mark.parametrize("grad_mode", ["single_pass", "recompute"])
def test_from_hidden_states_against_the_float64_oracle(kw, packed, backend, grad_mode,
                                                      monkeypatch, kept_rows):
    seq_ent = kw.get("importance_sampling_level") == "sequence" and kw.get("entropy_coef")
    if grad_mode == "single_pass" and seq_ent:
        pytest.skip("sequence level with an entropy bonus runs the recompute (refused below)")
    import alignkit.ops.token_pass as sp
    ran = []
    real = sp._token_grads
    monkeypatch.setattr(sp, "_token_grads", lambda *a: ran.append(1) or real(*a))
    h64, W64, b64, y, g = _inputs(seed=len(kw))
    S, Tn = y.shape
    old = torch.randn(S, Tn, generator=g, dtype=torch.float64) * 0.1 - 4
    ref = torch.randn(S, Tn, generator=g, dtype=torch.float64) * 0.1 - 4
    adv = torch.randn(S, generator=g, dtype=torch.float64)
    if kw["loss_type"] == "ppo":
        adv = torch.randn(S, Tn, generator=g, dtype=torch.float64)
    op = {k: kw[k] for k in ("softcap", "temperature") if k in kw}
    lk = {k: v for k, v in kw.items() if k not in op and k != "tiles"}
    extra = dict(ref_logprobs=ref) if kw.get("beta") else {}
    # oracle: float64 log-probs and entropies from full logits, then the same loss terms
    leaves = [t.requires_grad_() for t in (h64, W64, b64)]
    lp64, ent64 = reference_linear_token_logprobs(h64, W64, y, bias=b64, return_entropy=True,
                                                  **op)
    want, _ = ours_hidden_free(lp64, ent64, old, extra.get("ref_logprobs"), y, adv, lk)
    want_g = torch.autograd.grad(want, leaves)
    hh, WW, bb = (t.detach().float().requires_grad_() for t in (h64, W64, b64))
    call = dict(advantages=adv.float(), old_logprobs=old.float(), bias=bb, backend=backend,
                grad_mode=grad_mode,
                **{k: (v.float() if torch.is_tensor(v) else v) for k, v in extra.items()},
                **kw)
    if packed:                                          # [N, H] with segment ids
        seg = torch.arange(S).repeat_interleave(Tn)
        got, m = alignkit.policy_loss(hh.reshape(-1, hh.shape[-1]), WW, y.reshape(-1),
                                      segment_ids=seg,
                                      **{**call, "old_logprobs": old.float().reshape(-1),
                                         **({"ref_logprobs": ref.float().reshape(-1)}
                                            if "ref_logprobs" in extra else {}),
                                         **({"advantages": adv.float().reshape(-1)}
                                            if adv.dim() == 2 else {})},
                                      **({"max_completion_length": Tn}
                                         if kw["loss_type"] == "dr_grpo" else {}))
    else:
        got, m = alignkit.policy_loss(hh, WW, y, **call)
    got.backward()
    # fp32 against float64: the loss and gradients within fp32 round-off of sums over ~40 tokens
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    for name, a, b in zip(("hidden", "weight", "bias"), (hh.grad, WW.grad, bb.grad), want_g):
        err = (a.double() - b).abs().max().item()
        assert err < 1e-5 * max(1.0, b.abs().max().item()), (name, err)
    assert torch.isfinite(got) and m["entropy"] > 0
    assert hh.grad[2].abs().max() == 0                 # the fully masked completion
    assert len(ran) == (grad_mode == "single_pass")    # the token pass ran where asked for
    if grad_mode == "single_pass" and kw.get("importance_sampling_level") == "sequence":
        n = int((y != -100).sum())
        assert kept_rows == [12 if "tiles" in kw else n]  # the kept rows (the rest formed twice)


def ours_hidden_free(lp, ent, old, ref, y, adv, lk):
    """policy_loss's loss half on per-token log-probs of a [S, T] layout (the oracle's second
    half)."""
    return policy_loss_from_logprobs(lp, ent, y, advantages=adv, old_logprobs=old,
                                     ref_logprobs=ref, **lk)


def test_zero_advantages_and_all_masked_are_defined():
    h, W, b, y, _ = _inputs(seed=5)
    h, W = h.float().requires_grad_(), W.float().requires_grad_()
    loss, m = alignkit.policy_loss(h, W, y, advantages=torch.zeros(4), loss_type="grpo")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()
    y2 = torch.full_like(y, -100)
    loss2, m2 = alignkit.policy_loss(h, W, y2, advantages=torch.ones(4), loss_type="dapo",
                                     entropy_coef=0.1)
    assert loss2.item() == 0.0 and torch.isfinite(m2["entropy"])


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="gpro"), "unknown loss_type 'gpro'"),
    (dict(loss_type="luspo"), "luspo sums each sequence's terms"),
    (dict(loss_type="dapo", importance_sampling_level="sequence"), "longer sequences would count"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of k1, k2, k3"),
    (dict(beta=0.1), "beta > 0 needs ref_logprobs"),
    (dict(epsilon_low=float("nan")), "epsilon_low must be a finite number >= 0"),
    (dict(delta=0.5), "delta must be a finite number > 1"),
    (dict(loss_type="grpo", num_items=10), "num_items applies to dapo, cispo and vespo"),
    (dict(advantages=torch.zeros(3)), r"advantages must be \[S\] = \(4,\)"),
    (dict(old_logprobs=torch.zeros(4, 10)), "old_logprobs must be per token"),
])
def test_bad_input_is_refused_naming_the_argument(kw, match):
    h, W, b, y, _ = _inputs(seed=6)
    kw = dict(kw)
    adv = kw.pop("advantages", torch.zeros(4))
    with pytest.raises(ValueError, match=match):
        alignkit.policy_loss(h.float(), W.float(), y, advantages=adv, **kw)


def test_the_token_pass_a_second_backward_and_no_grad(monkeypatch):
    import alignkit.ops.token_pass as sp
    ran = []
    real = sp._token_grads
    monkeypatch.setattr(sp, "_token_grads", lambda *a: ran.append(a[-3:]) or real(*a))
    h64, W64, b64, y, g = _inputs(seed=8, H=512)
    h, W, b = (t.float().requires_grad_() for t in (h64, W64, b64))
    adv = torch.randn(4, generator=g)
    kw = dict(advantages=adv, loss_type="dapo", entropy_coef=0.01, bias=b,
              tiles=alignkit.TileOptions(plan="single_pass"))
    loss, _ = alignkit.policy_loss(h, W, y, **kw)        # the token pass, pinned
    assert ran == [(True, True, True)]
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in (h, W, b)]
    (2.0 * loss).backward()                               # accumulates: 3x once
    for g1, t in zip(once, (h, W, b)):
        torch.testing.assert_close(t.grad, 3.0 * g1, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        kw["tiles"] = None
        l0, _ = alignkit.policy_loss(h, W, y, **kw)       # forward only: the generic op
    assert len(ran) == 2 and l0.item() == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="sequence-level importance sampling with an entropy"):
        alignkit.policy_loss(h, W, y, advantages=adv, loss_type="grpo", entropy_coef=0.01,
                             importance_sampling_level="sequence", grad_mode="single_pass")


@pytest.mark.parametrize("grad_mode", ["auto", "single_pass", "recompute"])
def test_out_of_range_labels_are_refused_on_every_path(grad_mode):
    h, W, b, y, _ = _inputs(seed=7)
    y[0, 5] = W.shape[0]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 700\)"):
        alignkit.policy_loss(h.float().requires_grad_(), W.float(), y,
                             advantages=torch.zeros(4), grad_mode=grad_mode)
