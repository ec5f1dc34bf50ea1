"""policy_loss's off-policy corrections and token selections against TRL 1.16's own
GRPOTrainer._compute_loss / RLOOTrainer._compute_loss (through tests/trl_oracle.py's stand-ins):
vespo, the four rollout corrections with their bounds, off_policy_mask_threshold,
top_entropy_quantile, RLOO's summed ratio and kl_importance_weight's default; loss, the
gradients w.r.t. log-probs and entropies, and TRL's metrics; then from hidden states against the
float64 oracle on both gradient modes."""
import pytest
import torch

import alignkit
from alignkit.losses.policy import policy_loss_from_logprobs
from alignkit.testing.oracle import reference_linear_token_logprobs

trl = pytest.importorskip("trl")
from test_policy import _inputs, batch, ours  # noqa: E402
from trl_oracle import assert_matches_trl, trl_grpo, trl_rloo  # noqa: E402

B, T = 5, 9
TRL_NAMES = dict(rollout_correction="vllm_importance_sampling_mode",
                 rollout_correction_min="vllm_importance_sampling_clip_min",
                 rollout_correction_max="vllm_importance_sampling_clip_max")

CASES = [
    dict(loss_type="vespo"),
    dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5,
         vespo_lambda_neg=1.0, beta=0.05),
    dict(loss_type="vespo", rollout_correction="token_truncate", rollout_correction_min=0.8),
    dict(loss_type="vespo", rollout_correction="token_mask", rollout_correction_min=0.8,
         rollout_correction_max=1.25),
    dict(loss_type="dapo", rollout_correction="token_truncate", rollout_correction_min=0.8,
         rollout_correction_max=1.2),
    dict(loss_type="grpo", rollout_correction="token_mask", rollout_correction_min=0.8,
         rollout_correction_max=1.2, beta=0.04),
    dict(loss_type="bnpo", rollout_correction="sequence_truncate", rollout_correction_max=1.5),
    dict(loss_type="sapo", rollout_correction="sequence_mask", rollout_correction_min=0.3,
         rollout_correction_max=2.0),
    dict(loss_type="grpo", importance_sampling_level="sequence",
         rollout_correction="sequence_mask"),
    dict(loss_type="dapo", off_policy_mask_threshold=0.0),
    dict(loss_type="grpo", off_policy_mask_threshold=0.0, rollout="sampling", seed=7),
    dict(loss_type="dapo", top_entropy_quantile=0.3, entropy_coef=0.05),
    dict(loss_type="cispo", epsilon_high=1.2, top_entropy_quantile=0.0),
    dict(loss_type="dr_grpo", rollout_correction="token_mask", rollout_correction_min=0.8,
         off_policy_mask_threshold=0.0, top_entropy_quantile=0.5, beta=0.1, entropy_coef=0.01),
]


def _rollout(old_or_lp, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return old_or_lp.detach() + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)


def _trl_kw(case):
    kw = {TRL_NAMES.get(k, k): v for k, v in case.items()
          if k not in ("rollout", "importance_sampling_level", "epsilon_high", "entropy_coef",
                       "beta")}
    return kw


@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_trl_grpo_compute_loss(case, on_policy):
    case = dict(case)
    seed = case.pop("seed", len(str(case)))
    lp, ent, old, ref, mask, adv = batch(seed=seed)
    old = None if on_policy else old
    beta = case.get("beta", 0.0)
    need_rollout = "rollout_correction" in case or case.pop("rollout", None) == "sampling"
    rollout = _rollout(lp if old is None else old, seed) if need_rollout else None
    tk = _trl_kw(case)
    tk.pop("rollout", None)
    want, want_m = trl_grpo(
        lp, ent, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref if beta else None,
        beta=beta, importance_sampling_level=case.get("importance_sampling_level", "token"),
        epsilon_high=case.get("epsilon_high"), entropy_coef=case.get("entropy_coef", 0.0),
        sampling_per_token_logps=rollout, **tk)
    gw = torch.autograd.grad(want, (lp, ent), allow_unused=True)
    got, got_m = ours(lp, ent, old, ref if beta else None, mask, adv, rollout_logprobs=rollout,
                      **case)
    go = torch.autograd.grad(got, (lp, ent), allow_unused=True)
    assert_matches_trl(got, got_m, go, want, want_m, gw, mask)
    if case["loss_type"] == "vespo":
        assert "vespo/phi_seq_mean" in got_m
    # the option bit: without it the loss differs (so a dropped option fails this test)
    plain = {k: v for k, v in case.items()
             if k in ("loss_type", "importance_sampling_level", "epsilon_high", "beta",
                      "entropy_coef")}
    if (case["loss_type"] == "vespo" and len(case) == 1) or \
            (on_policy and not need_rollout and case.get("top_entropy_quantile", 1) == 1):
        return                      # on-policy without a sampler: ρ = 1, nothing to correct
    base, _ = ours(lp, ent, old, ref if beta else None, mask, adv, **plain)
    assert abs(base.item() - got.item()) > 1e-6


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_rloo_summed_ratio_matches_trl_rloo(eps_high):
    lp, ent, old, _, mask, adv = batch(seed=11, scale=0.4)
    # a completion with no labelled token: TRL's RLOO adds −A_s/B to the loss value (ρ = 1, no
    # gradient), alignkit's per-sequence mean adds 0 (as TRL's GRPO does); its advantage is 0
    # here so that the values compare
    adv[4] = 0.0
    old_seq = (old * mask).sum(1)
    want, want_m = trl_rloo(lp, ent, mask, adv, old_seq, epsilon_high=eps_high)
    gw = torch.autograd.grad(want, lp)[0]
    got, got_m = ours(lp, ent, old, None, mask, adv, loss_type="grpo",
                      importance_sampling_level="sequence_sum", epsilon_high=eps_high)
    go = torch.autograd.grad(got, lp)[0].reshape(B, T)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(go * mask, gw * mask, rtol=1e-10, atol=1e-12)
    for k, v in want_m.items():
        assert got_m[k].item() == pytest.approx(v, rel=1e-6, abs=1e-9), k
    mean_level, _ = ours(lp, ent, old, None, mask, adv, loss_type="grpo",
                         importance_sampling_level="sequence", epsilon_high=eps_high)
    assert abs(mean_level.item() - got.item()) > 1e-6       # the sum, not GSPO's mean


def test_kl_importance_weight_defaults_to_trls_true():
    lp, ent, old, ref, mask, adv = batch(seed=4)
    d, _ = ours(lp, ent, old, ref, mask, adv, loss_type="grpo", beta=0.1)
    t, _ = ours(lp, ent, old, ref, mask, adv, loss_type="grpo", beta=0.1,
                kl_importance_weight=True)
    f, _ = ours(lp, ent, old, ref, mask, adv, loss_type="grpo", beta=0.1,
                kl_importance_weight=False)
    assert d.item() == t.item() and abs(d.item() - f.item()) > 1e-6
    w, _ = trl_grpo(lp, ent, mask, adv, loss_type="grpo", old_per_token_logps=old,
                    ref_per_token_logps=ref, beta=0.1)      # TRL's default config
    torch.testing.assert_close(d, w, rtol=1e-10, atol=1e-12)


HIDDEN = [
    dict(loss_type="vespo", beta=0.04),
    dict(loss_type="dapo", rollout_correction="token_truncate", rollout_correction_min=0.9,
         rollout_correction_max=1.1),
    dict(loss_type="grpo", rollout_correction="sequence_mask", on_policy=True),
    dict(loss_type="dapo", off_policy_mask_threshold=0.0, rollout="sampling"),
    dict(loss_type="bnpo", top_entropy_quantile=0.4),
    dict(loss_type="bnpo", top_entropy_quantile=0.4, entropy_coef=0.05),
    dict(loss_type="grpo", importance_sampling_level="sequence_sum"),
]


@pytest.mark.parametrize("kw", HIDDEN, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("grad_mode", ["single_pass", "recompute"])
def test_from_hidden_states_against_the_float64_oracle(kw, grad_mode, backend, monkeypatch):
    kw = dict(kw)
    on_policy = kw.pop("on_policy", False)
    sampling = kw.pop("rollout", None) == "sampling" or "rollout_correction" in kw
    coupled = not (kw["loss_type"] == "dapo" and "rollout_correction" in kw)
    if grad_mode == "single_pass" and coupled and kw.get("entropy_coef"):
        with pytest.raises(ValueError, match="top_entropy_quantile .* with an entropy bonus"):
            h, W, b, y, g = _inputs(seed=1)
            alignkit.policy_loss(h.float(), W.float(), y, advantages=torch.zeros(4),
                                 grad_mode="single_pass", **kw)
        return
    import alignkit.ops.token_pass as sp
    ran = []
    real = sp._token_grads
    monkeypatch.setattr(sp, "_token_grads", lambda *a: ran.append(a[4].coupled) or real(*a))
    h64, W64, b64, y, g = _inputs(seed=len(kw) + 20, S=5, Tn=13)
    S, Tn = y.shape
    leaves = [t.requires_grad_() for t in (h64, W64, b64)]
    lp64, ent64 = reference_linear_token_logprobs(h64, W64, y, bias=b64, return_entropy=True)
    base = lp64.detach()
    old = None if on_policy else base + 0.2 * torch.randn(S, Tn, generator=g, dtype=torch.float64)
    ref = base + 0.1 * torch.randn(S, Tn, generator=g, dtype=torch.float64)
    roll = (base if old is None else old) + 0.15 * torch.randn(S, Tn, generator=g,
                                                                dtype=torch.float64)
    adv = torch.randn(S, generator=g, dtype=torch.float64)
    extra = dict(ref_logprobs=ref) if kw.get("beta") else {}
    if sampling:
        extra["rollout_logprobs"] = roll
    want, _ = policy_loss_from_logprobs(lp64, ent64, y, advantages=adv, old_logprobs=old,
                                        **extra, **kw)
    want_g = torch.autograd.grad(want, leaves)
    hh, WW, bb = (t.detach().float().requires_grad_() for t in (h64, W64, b64))
    got, _ = alignkit.policy_loss(
        hh, WW, y, bias=bb, advantages=adv.float(),
        old_logprobs=None if old is None else old.float(), backend=backend, grad_mode=grad_mode,
        **{k: v.float() for k, v in extra.items()}, **kw)
    got.backward()
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    for name, a, b in zip(("hidden", "weight", "bias"), (hh.grad, WW.grad, bb.grad), want_g):
        err = (a.double() - b).abs().max().item()
        assert err < 1e-5 * max(1.0, b.abs().max().item()), (name, err)
    # the single pass ran, coupled exactly where a coefficient needs the whole batch
    assert ran == ([coupled] if grad_mode == "single_pass" else [])


@pytest.mark.parametrize("kw,match", [
    (dict(rollout_correction="token_clip", rollout_logprobs=0),
     "rollout_correction must be None or one of token_truncate"),
    (dict(rollout_correction="token_mask"), "rollout_correction needs rollout_logprobs"),
    (dict(rollout_logprobs=0), "rollout_logprobs is read only with rollout_correction"),
    (dict(rollout_correction="token_mask", rollout_logprobs=0, rollout_correction_min=2.0,
          rollout_correction_max=1.0), r"rollout_correction_min \(2.0\) must be <="),
    (dict(rollout_correction="token_mask", rollout_logprobs=0, rollout_correction_max=-1.0),
     "rollout_correction_max must be a finite number >= 0"),
    (dict(rollout_correction="token_mask", rollout_logprobs="short"),
     "rollout_logprobs must be per token"),
    (dict(top_entropy_quantile=1.5), r"top_entropy_quantile must be in \[0, 1\], got 1.5"),
    (dict(off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold must be"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"),
     "vespo forms its sequence weight itself"),
    (dict(loss_type="vespo", rollout_correction="sequence_mask", rollout_logprobs=0),
     "vespo takes rollout_correction 'token_truncate' or 'token_mask'"),
    (dict(loss_type="grpo", vespo_k_pos=1.0), "apply to loss_type='vespo', not 'grpo'"),
    (dict(loss_type="dapo", importance_sampling_level="sequence_sum"),
     "importance_sampling_level='sequence_sum' with 'dapo'"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level must be one of token"),
])
def test_bad_corrections_are_refused_naming_the_argument(kw, match):
    h, W, b, y, _ = _inputs(seed=6)
    kw = dict(kw)
    if "rollout_logprobs" in kw:
        kw["rollout_logprobs"] = (torch.zeros(4, 5) if kw["rollout_logprobs"] == "short"
                                  else torch.zeros(y.shape))
    with pytest.raises(ValueError, match=match):
        alignkit.policy_loss(h.float(), W.float(), y, advantages=torch.zeros(4), **kw)
