"""TRL 1.16's DPO / KTO / CPO options in alignkit's losses, against TRL's own loss code (through
the stand-ins of trl_oracle.py): loss and the gradient of every per-token log-prob, in float64
on fresh inputs (odd lengths, prompt tokens unlabelled, large log-ratios); the fused front door
against the float64 oracle; cDPO's name pinned."""
import zlib

import pytest
import torch

from alignkit.losses import cpo_loss, dpo_loss, kto_loss, preference_loss
from alignkit.losses.pairwise import _F_DIVERGENCE_TYPES_OK
from trl_oracle import trl_cpo, trl_dpo, trl_kto

pytest.importorskip("trl")

B, L = 5, 13


def _batch(seed, dtype=torch.float64, scale=3.0, noise=4.0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, L, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(1, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, L + 1, (1,), generator=g))
        mask[i, start:end] = 1
    ptl = (-torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64) * scale
           * mask[:, 1:]).to(dtype)
    # reference log-ratios of both signs and of several nats
    ref = ptl.detach().sum(1) + noise * torch.randn(2 * B, generator=g,
                                                    dtype=torch.float64).to(dtype)
    # log Σ_v p_v² of a real distribution lies in [log p_max², log p_max]; any value ≤ 0 will do
    lss = -torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64).to(dtype) * 2 * mask[:, 1:]
    return ptl, mask, ref, lss


def _both(ptl, mask, ref, trl_kw, ours_kw, lss=None):
    """(TRL's loss, its grad wrt ptl), (ours, ours' grad), on the same log-probs."""
    p1 = ptl.detach().clone().requires_grad_()
    t_loss, t_m = trl_dpo(p1, mask, ref[:B], ref[B:], **trl_kw,
                          log_sum_sq_probs=lss)
    t_loss.backward()
    p2 = ptl.detach().clone().requires_grad_()
    sums = p2.sum(1)
    counts = mask[:, 1:].sum(1).to(ptl.dtype)
    kw = {}
    if lss is not None:
        from alignkit.losses.pairwise import wpo_aligned_logps
        al = wpo_aligned_logps(sums, lss.sum(1), counts)
        kw = dict(use_weighting=True, chosen_aligned_logps=al[:B], rejected_aligned_logps=al[B:])
    loss, m = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], chosen_counts=counts[:B],
                       rejected_counts=counts[B:], **ours_kw, **kw)
    loss.backward()
    keep = mask[:, 1:].to(ptl.dtype)          # the gradient of the labelled tokens
    return (t_loss.detach(), p1.grad * keep, t_m), (loss.detach(), p2.grad * keep, m)


def _close(t, o, rtol=1e-10, atol=1e-12):
    assert torch.allclose(o[0], t[0].to(o[0].dtype), rtol=rtol, atol=atol), (o[0], t[0])
    assert o[1].abs().sum() > 0
    assert torch.allclose(o[1], t[1], rtol=rtol, atol=atol), (o[1] - t[1]).abs().max()
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert abs(o[2][k].item() - t[2][k]) < 1e-6 * max(1.0, abs(t[2][k])), k


def _eps(t):
    return 0.1 if t in ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired") else 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("loss_type", [t for t in _F_DIVERGENCE_TYPES_OK if t != "cdpo"])
def test_f_divergence_matches_trl(kind, loss_type):
    # a seed of its own per case, the same in every process (str hash() is salted per process)
    ptl, mask, ref, _ = _batch(zlib.crc32(f"{kind}/{loss_type}".encode()) % 997)
    eps = _eps(loss_type)
    t, o = _both(ptl, mask, ref, dict(beta=0.3, loss_types=[loss_type], label_smoothing=eps,
                                      f_divergence_type=kind),
                 dict(beta=0.3, loss_type=loss_type, label_smoothing=eps, f_divergence_type=kind))
    if loss_type == "exo_pair":
        # exo_pair's two saturating sigmoid terms cancel in the gradient: a salted seed once left
        # 4.6e-10 on a 1.2e-6 entry, so the tolerance is relative to the gradient's scale
        _close(t, o, rtol=1e-6, atol=1e-6 * float(t[1].abs().max()))
    else:
        _close(t, o, rtol=1e-10)


@pytest.mark.parametrize("coef", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "discopop"])
def test_alpha_divergence_matches_trl(coef, loss_type):
    # TRL's alpha-divergence clamps per dtype and knows fp16/bf16/fp32 only: compared in fp32
    ptl, mask, ref, _ = _batch(int(coef * 10) + len(loss_type), dtype=torch.float32, scale=1.0,
                               noise=1.0)
    t, o = _both(ptl, mask, ref, dict(beta=0.3, loss_types=[loss_type],
                                      f_divergence_type="alpha_divergence",
                                      f_alpha_divergence_coef=coef),
                 dict(beta=0.3, loss_type=loss_type, f_divergence_type="alpha_divergence",
                      f_alpha_divergence_coef=coef))
    _close(t, o, rtol=2e-5, atol=2e-6)


def test_alpha_divergence_clamp_matches_trl():
    """(α − 1)·ρ past 80: TRL clamps the exponent there (its gradient is 0 past it), and so does
    alignkit."""
    ptl, mask, ref, _ = _batch(77, dtype=torch.float32, scale=1.0, noise=1.0)
    ref = ref - 150 * torch.tensor([1.0, 0, 1.0] + [0.0] * (2 * B - 3))   # ρ ≈ 150: clamped
    t, o = _both(ptl, mask, ref, dict(beta=0.01, loss_types=["sigmoid"],
                                      f_divergence_type="alpha_divergence",
                                      f_alpha_divergence_coef=1.9),
                 dict(beta=0.01, loss_type="sigmoid", f_divergence_type="alpha_divergence",
                      f_alpha_divergence_coef=1.9))
    _close(t, o, rtol=2e-5, atol=2e-6)


def test_vocab_row_stats_online_log_sum_sq_matches_float64():
    """The online log Σ p² (no lse given: running max, both sums rescaled) over many vocabulary
    tiles and row blocks, soft cap and temperature, large logits, against full float64 logits."""
    from alignkit.ops.vocab_stats import vocab_row_stats
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(37, 19, generator=g, dtype=torch.float64) * 4
    W = torch.randn(997, 19, generator=g, dtype=torch.float64)
    bias = torch.randn(997, generator=g, dtype=torch.float64) * 3
    for softcap, temp in ((None, 1.0), (30.0, 0.7)):
        x = rows @ W.T + bias
        z = (softcap * torch.tanh(x / softcap) if softcap else x) / temp
        want = torch.logsumexp(2 * torch.log_softmax(z, -1), -1)
        got = vocab_row_stats(rows, W, bias, temperature=temp, softcap=softcap, sum_sq=True,
                              row_block=5, vocab_block=64)["log_sum_sq_probs"]
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got - want).abs().max()


@pytest.mark.parametrize("types", [["sigmoid"], ["ipo"], ["bco_pair", "sppo_hard"], ["robust"],
                                   ["apo_zero", "sigmoid_norm"], ["nca_pair"], ["discopop"]])
def test_wpo_matches_trl(types):
    ptl, mask, ref, lss = _batch(len("".join(types)))
    eps = max(_eps(t) for t in types)
    w = [1.0, 0.4][:len(types)]
    t, o = _both(ptl, mask, ref, dict(beta=0.2, loss_types=types, loss_weights=w,
                                      label_smoothing=eps),
                 dict(beta=0.2, loss_type=types, loss_weights=w, label_smoothing=eps), lss=lss)
    _close(t, o)
    # the weights matter here: without them the loss differs
    plain = dpo_loss(*(x for x in (ptl.sum(1)[:B], ptl.sum(1)[B:], ref[:B], ref[B:])), beta=0.2,
                     loss_type=types, loss_weights=w, label_smoothing=eps,
                     chosen_counts=mask[:, 1:].sum(1)[:B].double(),
                     rejected_counts=mask[:, 1:].sum(1)[B:].double())[0]
    assert not torch.allclose(plain, o[0], rtol=1e-3)


def test_wpo_hinge_matches_trls_forward():
    """TRL 1.16 forms WPO's hinge loss but cannot differentiate it (its in-place product
    overwrites the relu output autograd saved): the loss is compared, the gradient is the
    weighted relu's (checked against autograd on the formula)."""
    ptl, mask, ref, lss = _batch(29)
    with torch.no_grad():
        t_loss, _ = trl_dpo(ptl, mask, ref[:B], ref[B:], beta=0.2, loss_types=["hinge"],
                            log_sum_sq_probs=lss)
    from alignkit.losses.pairwise import wpo_aligned_logps
    s = ptl.sum(1).requires_grad_()
    counts = mask[:, 1:].sum(1).double()
    al = wpo_aligned_logps(s, lss.sum(1), counts)
    loss, _ = dpo_loss(s[:B], s[B:], ref[:B], ref[B:], beta=0.2, loss_type="hinge",
                       use_weighting=True, chosen_aligned_logps=al[:B],
                       rejected_aligned_logps=al[B:])
    assert torch.allclose(loss, t_loss, rtol=1e-12)
    w = torch.exp(al[:B] + al[B:])
    want = (w * torch.relu(1 - 0.2 * ((s[:B] - ref[:B]) - (s[B:] - ref[B:])))).mean()
    g1, = torch.autograd.grad(loss, s, retain_graph=True)
    g2, = torch.autograd.grad(want, s)
    assert g1.abs().sum() > 0 and torch.allclose(g1, g2, rtol=1e-12)


def test_wpo_with_f_divergence_matches_trl():
    ptl, mask, ref, lss = _batch(41)
    t, o = _both(ptl, mask, ref, dict(beta=0.2, loss_types=["sigmoid"],
                                      f_divergence_type="js_divergence"),
                 dict(beta=0.2, loss_type="sigmoid", f_divergence_type="js_divergence"), lss=lss)
    _close(t, o)


def test_label_smoothing_with_sigmoid_is_trls_and_cdpo_is_conservative_dpo():
    """TRL 1.16's sigmoid ignores label_smoothing: ["sigmoid", "robust"] with 0.1 gives TRL's
    loss (sigmoid unsmoothed, robust smoothed); cDPO is loss_type "cdpo"; sigmoid alone with a
    smoothing raises and names cdpo."""
    ptl, mask, ref, _ = _batch(17)
    types = ["sigmoid", "robust"]
    t, o = _both(ptl, mask, ref, dict(beta=0.2, loss_types=types, label_smoothing=0.1),
                 dict(beta=0.2, loss_type=types, label_smoothing=0.1))
    _close(t, o)
    s, r = ptl.sum(1), ref
    z = 0.2 * ((s[:B] - r[:B]) - (s[B:] - r[B:]))
    cdpo, _ = dpo_loss(s[:B], s[B:], r[:B], r[B:], beta=0.2, loss_type="cdpo",
                       label_smoothing=0.1)
    want = (-0.9 * torch.nn.functional.logsigmoid(z)
            - 0.1 * torch.nn.functional.logsigmoid(-z)).mean()
    assert torch.allclose(cdpo, want, rtol=1e-12)
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect.*'cdpo'"):
        dpo_loss(s[:B], s[B:], r[:B], r[B:], loss_type="sigmoid", label_smoothing=0.1)


@pytest.mark.parametrize("opts,match", [
    (dict(f_divergence_type="kl"), "f_divergence_type must be one of"),
    (dict(f_divergence_type="js_divergence", loss_type="bco_pair"),
     r"f_divergence_type='js_divergence' applies to .*\['bco_pair'\]"),
    (dict(f_alpha_divergence_coef=float("nan")), "f_alpha_divergence_coef must be"),
    (dict(use_weighting=1), "use_weighting must be True or False"),
    (dict(use_weighting=True), "use_weighting=True needs chosen_aligned_logps"),
    (dict(use_weighting=True, loss_type="aot", label_smoothing=0.1,
          chosen_aligned_logps=torch.zeros(2), rejected_aligned_logps=torch.zeros(2)),
     r"use_weighting \(WPO\) does not apply to loss_type \['aot'\]"),
    (dict(chosen_aligned_logps=torch.zeros(2), rejected_aligned_logps=torch.zeros(2)),
     "apply only with use_weighting=True"),
])
def test_dpo_option_errors_name_the_argument(opts, match):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(z, z, z, z, **opts)


# ---------------------------------------------------------------------------------- CPO
@pytest.mark.parametrize("loss_type,alpha,eps", [
    ("simpo", 0.0, 0.0), ("simpo", 0.0, 0.1), ("simpo", 0.3, 0.0), ("alphapo", 0.25, 0.0),
    ("alphapo", -0.4, 0.1), ("sigmoid", 0.6, 0.1), ("hinge", 0.2, 0.0), ("ipo", 0.2, 0.0)])
def test_cpo_simpo_alphapo_alpha_match_trl(loss_type, alpha, eps):
    g = torch.Generator().manual_seed(len(loss_type) + int(alpha * 10))
    c = (-torch.rand(B, generator=g, dtype=torch.float64) * 3).requires_grad_()
    r = (-torch.rand(B, generator=g, dtype=torch.float64) * 3).requires_grad_()
    # CPOConfig turns alphapo into simpo with cpo_alpha = 0
    trl_type, cpo_alpha = ("simpo", 0.0) if loss_type == "alphapo" else (loss_type, 0.6)
    losses, cr, rr = trl_cpo(c, r, beta=0.7, loss_type=trl_type, label_smoothing=eps,
                             simpo_gamma=0.8 if trl_type == "simpo" else 0.5, alpha=alpha)
    nll = (-c.sum() / 17)                       # any differentiable NLL term
    want = losses.mean() + cpo_alpha * nll      # TRL's get_batch_loss_metrics
    gw = torch.autograd.grad(want, (c, r), retain_graph=True)
    kw = dict(simpo_gamma=0.8) if loss_type in ("simpo", "alphapo") else {}
    if loss_type != "alphapo":
        kw["cpo_alpha"] = cpo_alpha
    loss, m = cpo_loss(c, r, nll=nll, beta=0.7, loss_type=loss_type, label_smoothing=eps,
                       alpha=alpha, **kw)
    go = torch.autograd.grad(loss, (c, r))
    assert torch.allclose(loss, want, rtol=1e-12), (loss, want)
    for a, b in zip(go, gw):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert torch.allclose(m["rewards/chosen"], cr.mean(), rtol=1e-12)
    assert torch.allclose(m["rewards/rejected"], rr.mean(), rtol=1e-12)


@pytest.mark.parametrize("opts,match", [
    (dict(loss_type="alphapo", cpo_alpha=0.5), "cpo_alpha=0.5 with loss_type 'alphapo'"),
    (dict(loss_type="sigmoid", simpo_gamma=1.0), "simpo_gamma applies to CPO loss_type simpo"),
    (dict(loss_type="kto"), "unknown CPO loss_type 'kto'"),
    (dict(alpha=float("inf")), "alpha must be a finite number"),
    (dict(cpo_alpha=-1.0), "cpo_alpha must be"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing applies to CPO loss_type"),
])
def test_cpo_option_errors_name_the_argument(opts, match):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        cpo_loss(z, z, nll=z.sum(), **opts)


# ---------------------------------------------------------------------------------- KTO
def test_kto_apo_zero_unpaired_matches_trl():
    g = torch.Generator().manual_seed(12)
    N = 9
    mask = torch.zeros(N, L, dtype=torch.long)
    mask[:, 2:] = 1
    mask[4, 9:] = 0
    ptl = (-torch.rand(N, L - 1, generator=g, dtype=torch.float64) * 2 * mask[:, 1:])
    labels = torch.tensor([True, False, True, True, False, True, False, False, True])
    ref = ptl.sum(1) + torch.randn(N, generator=g, dtype=torch.float64) * 5
    p1 = ptl.clone().requires_grad_()
    t_loss, t_m = trl_kto(p1, mask, labels, ref, None, None, beta=0.3, desirable_weight=1.3,
                          undesirable_weight=0.7, loss_type="apo_zero_unpaired")
    t_loss.backward()
    p2 = ptl.clone().requires_grad_()
    loss, m = kto_loss(p2.sum(1), ref, labels, beta=0.3, desirable_weight=1.3,
                       undesirable_weight=0.7, loss_type="apo_zero_unpaired")
    loss.backward()
    assert torch.allclose(loss, t_loss.double(), rtol=1e-12)
    assert torch.allclose(p2.grad, p1.grad, rtol=1e-10, atol=1e-14)
    for k in ("rewards/chosen", "rewards/rejected", "kl"):
        assert abs(m[k].item() - t_m[k]) < 1e-9, k


def test_kto_loss_type_errors_name_the_argument():
    z = torch.zeros(2)
    d = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown KTO loss_type 'bco'; valid: kto, apo_zero"):
        kto_loss(z, z, d, loss_type="bco")
    with pytest.raises(ValueError, match="'apo_zero_unpaired' has no reference point"):
        kto_loss(z, z, d, loss_type="apo_zero_unpaired", kl=0.5)


# ------------------------------------------------------------- the front door, every plan
@pytest.mark.parametrize("opts,shape", [
    # WPO on a flatter head (scale 0.3): log π(y) − log Σ p² of a few tenths, weights near 1
    (dict(use_weighting=True), dict(pairs=2, scale=0.3)),
    (dict(use_weighting=True, loss_type=["ipo", "hinge"], loss_weights=[1.0, 0.5]),
     dict(pairs=1, packed=True, scale=0.3)),
    (dict(f_divergence_type="js_divergence"), dict(pairs=1)),
    (dict(f_divergence_type="forward_kl", loss_type="sigmoid_norm"), dict(pairs=2, packed=True)),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
          use_weighting=True, softcap=4.0, temperature=0.8), dict(pairs=2, packed=True,
                                                                  scale=0.5)),
])
def test_preference_loss_options_against_float64_oracle(opts, shape):
    """preference_loss in fp32 (the recompute and the single pass) against the float64 oracle
    (full logits; WPO's log Σ p² from them): loss and the gradients of hidden, weight and bias,
    within a few times the recompute's own fp32 error; the two plans' metrics agree."""
    from alignkit.testing.oracle import oracle_preference_loss, reference_sequence_logprobs
    from conftest import assert_oracle
    from test_single_pass import pair_inputs
    h64, W64, b64, y, seg = pair_inputs(T=29, H=24, V=700, bias=True, seed=5, **shape)
    S = 2 * shape["pairs"]
    head = {k: opts[k] for k in ("softcap", "temperature") if k in opts}
    sums, _ = reference_sequence_logprobs(h64, W64, y, bias=b64, segment_ids=seg,
                                          num_segments=S if seg is not None else None, **head)
    # log-ratios of a few nats, both signs: every f-DPO score has a live gradient there
    ref = sums + 3 * torch.randn(S, generator=torch.Generator().manual_seed(3), dtype=sums.dtype)
    kw = dict(segment_ids=seg, num_segments=S if seg is not None else None, beta=0.1, **opts)
    oracle = {}
    for dt in (torch.float64, torch.float32):     # float64: the truth; fp32: torch's own error
        leaves = [t.detach().to(dt).requires_grad_() for t in (h64, W64, b64)]
        out, _ = oracle_preference_loss(*leaves[:2], y, bias=leaves[2],
                                        ref_logprobs=ref.to(dt), **kw)
        out.backward()
        oracle[dt] = (out.detach(), *(t.grad for t in leaves))
    want, naive = oracle[torch.float64], oracle[torch.float32]
    runs = {}
    for mode in ("recompute", "single_pass"):
        leaves = [t.detach().float().requires_grad_() for t in (h64, W64, b64)]
        out, m = preference_loss(*leaves[:2], y, bias=leaves[2], ref_logprobs=ref.float(),
                                 grad_mode=mode, backend="torch", **kw)
        out.backward()
        runs[mode] = (out.detach(), *(t.grad for t in leaves), m)
    rec, sp = runs["recompute"], runs["single_pass"]
    if opts.get("use_weighting"):                  # the weights are O(1), not a rounding
        assert want[0] > 1e-3                      # (the floor of assert_oracle is ~1e-6)
    for i, name in enumerate(("loss", "hidden", "weight", "bias")):
        assert sp[i].abs().sum() > 0, name
        assert_oracle(f"single pass {name}", sp[i], want[i], naive[i])
        assert_oracle(f"recompute {name}", rec[i], want[i], naive[i])
    for k in rec[4]:
        torch.testing.assert_close(sp[4][k], rec[4][k], rtol=1e-4, atol=1e-4, msg=k)


def test_preference_loss_wpo_refuses_a_given_log_sum_sq():
    from test_single_pass import pair_inputs
    h, W, b, y, _ = pair_inputs()
    with pytest.raises(ValueError, match="log_sum_sq_probs is computed inside"):
        preference_loss(h.float(), W.float(), y, ref_logprobs=torch.zeros(2), use_weighting=True,
                        log_sum_sq_probs=torch.zeros(2))


# ------------------------------------------------------------------ the trainer's option check
@pytest.mark.parametrize("loss,options,ok", [
    ("dpo", dict(use_weighting=True, f_divergence_type="js_divergence"), True),
    ("dpo", dict(loss_type="cdpo", label_smoothing=0.1), True),
    ("dpo", dict(loss_type="sigmoid", label_smoothing=0.1), "conservative DPO is loss_type 'cdpo'"),
    ("dpo", dict(log_sum_sq_probs=[0.0, 0.0], use_weighting=True), "computed by the trainer"),
    ("dpo", dict(f_divergence_type="js_divergence", loss_type="nca_pair"), "f_divergence_type"),
    ("cpo", dict(loss_type="alphapo", alpha=0.2, simpo_gamma=1.0), True),
    ("cpo", dict(loss_type="alphapo", cpo_alpha=1.0), "cpo_alpha=1.0 with loss_type 'alphapo'"),
    ("dpo", dict(ld_alpha=0.5), "ld_alpha is not served by the trainer"),
    ("kto", dict(loss_type="apo_zero_unpaired"), True),
    ("kto", dict(loss_type="apo_zero_unpaired", kl_estimate="mismatched"), "no reference point"),
    ("kto", dict(loss_type="bco"), "unknown KTO loss_type 'bco'"),
])
def test_trainer_config_checks_the_new_options(loss, options, ok):
    from alignkit.train.config import ConfigError, TrainConfig
    from alignkit.train.objective import kto_uses_kl
    cfg = dict(model_config={"model_type": "llama"}, tokenizer="tok", loss=loss,
               loss_options=options)
    if ok is True:
        c = TrainConfig.from_dict(cfg)
        if loss == "kto":                     # apo_zero_unpaired scores no mismatched pairs
            assert not kto_uses_kl(c.loss, c.loss_options)
    else:
        with pytest.raises(ConfigError, match=ok):
            TrainConfig.from_dict(cfg)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
def test_cpo_reduction_follows_trl(loss_type):
    """TRL 1.16's CPOTrainer: sums for sigmoid and hinge, per-token averages for ipo, simpo and
    alphapo (average_log_prob=loss_type in ["ipo", "simpo"], alphapo being simpo there)."""
    from alignkit.testing.oracle import reference_sequence_logprobs
    from test_single_pass import pair_inputs
    h, W, _, y, _ = pair_inputs(T=21, H=16, V=300, pairs=2, seed=4)
    sums, counts = reference_sequence_logprobs(h, W, y)
    counts = counts.double()
    x = sums / counts if loss_type in ("ipo", "simpo", "alphapo") else sums
    nll = -sums[:2].sum() / counts[:2].sum()
    want, _ = cpo_loss(x[:2], x[2:], nll=nll, beta=0.05, loss_type=loss_type)
    got, _ = preference_loss(h.float(), W.float(), y, loss="cpo", beta=0.05, loss_type=loss_type)
    assert torch.allclose(got.double(), want, rtol=1e-4), (got, want)


# ------------------------------------------------------------------------------- LD-DPO
def _ld_case(packed, seed=6, pairs=2):
    from test_single_pass import pair_inputs
    h, W, b, y, seg = pair_inputs(T=19, H=12, V=211, pairs=pairs, seed=seed)
    y[0, 9:11] = -100                      # a hole inside a response
    y[pairs + 1, 6:] = -100                # lengths differ both ways across the pairs
    return h, W, y


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("opts", [dict(ld_alpha=0.3),
                                  dict(ld_alpha=0.0, loss_type=["ipo", "bco_pair"]),
                                  dict(ld_alpha=0.6, use_weighting=True,
                                       f_divergence_type="js_divergence")])
def test_ld_alpha_matches_trl_through_preference_loss(opts, packed):
    """preference_loss(ld_alpha=...) against TRL 1.16's DPOTrainer on the same per-token
    log-probs (the oracle's full float64 logits): loss and the gradients of hidden and weight.
    alignkit's op runs its GEMMs in fp32 even for float64 inputs: fp32 tolerances."""
    from alignkit.testing.oracle import reference_linear_token_logprobs
    h, W, y = _ld_case(packed)
    S, T = y.shape
    B_ = S // 2
    ref = -40 + 4 * torch.randn(S, generator=torch.Generator().manual_seed(2),
                                dtype=torch.float64)
    mask = torch.zeros(S, T + 1, dtype=torch.long)
    mask[:, 1:] = (y != -100).long()
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ptl = reference_linear_token_logprobs(h1, W1, y)
    lss = None
    if opts.get("use_weighting"):
        with torch.no_grad():
            lss = torch.logsumexp(2 * torch.log_softmax(h @ W.T, -1), -1)
    types = opts.get("loss_type", ["sigmoid"])
    t_loss, t_m = trl_dpo(ptl, mask, ref[:B_], ref[B_:], beta=0.1, loss_types=types,
                          ld_alpha=opts["ld_alpha"], log_sum_sq_probs=lss,
                          f_divergence_type=opts.get("f_divergence_type", "reverse_kl"))
    t_loss.backward()
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    kw = dict(opts)
    if packed:
        kw.update(segment_ids=torch.arange(S).repeat_interleave(T), num_segments=S)
        hh, yy = h2.reshape(-1, h.shape[-1]), y.reshape(-1)
    else:
        hh, yy = h2, y
    loss, m = preference_loss(hh, W2, yy, ref_logprobs=ref, beta=0.1, **kw)
    loss.backward()
    assert torch.allclose(loss.double(), t_loss, rtol=2e-6), (loss, t_loss)
    for a, b in ((h2.grad, h1.grad), (W2.grad, W1.grad)):
        assert a.abs().sum() > 0
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max(), (a.double() - b).abs().max()
    assert abs(m["logps/chosen"].item() - t_m["logps/chosen"]) < 1e-5 * abs(t_m["logps/chosen"])


def test_ld_alpha_reference_from_ref_hidden_and_errors():
    from alignkit.losses.ld import ld_sequence_logprobs
    h, W, y = _ld_case(False)
    g = torch.Generator().manual_seed(1)
    rh, rW = h + 0.1 * torch.randn(h.shape, generator=g, dtype=h.dtype), W.clone()
    a, _ = preference_loss(h, W, y, ref_hidden=rh, ref_weight=rW, ld_alpha=0.4)
    ref = ld_sequence_logprobs(rh, rW, y, 0.4)[0]
    b, _ = preference_loss(h, W, y, ref_logprobs=ref, ld_alpha=0.4)
    assert torch.allclose(a, b, rtol=1e-6)
    c, _ = preference_loss(h, W, y, ref_hidden=rh, ref_weight=rW)          # the plain ones
    assert not torch.allclose(a, c, rtol=1e-3)
    z = torch.zeros(4)
    for kw, match in ((dict(ld_alpha=1.5), r"ld_alpha must be in \[0, 1\]"),
                      (dict(ld_alpha=0.5, average=True), "average=True is refused"),
                      (dict(ld_alpha=0.5, grad_mode="single_pass"), "single_pass' is refused"),
                      (dict(ld_alpha=0.5, loss_type=["sigmoid", "sft"]), "'sft' is refused")):
        with pytest.raises(ValueError, match=match):
            preference_loss(h, W, y, ref_logprobs=z, **kw)
    from alignkit.losses import logprob_loss
    with pytest.raises(ValueError, match="ld_alpha needs each token's log-prob"):
        logprob_loss(z, torch.ones(4, dtype=torch.long), ref_logprobs=z, ld_alpha=0.5)
