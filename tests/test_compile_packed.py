"""Packed input ([N, H] with segment_ids) under torch.compile(fullgraph=True): the compiled loss,
metrics and gradients equal eager's, the segment range is still checked where the graph runs,
and a segment count that would have to come from the data is refused by name.

Before, every packed front door failed to trace: the range check read min and max on the host
(`int(seg.min())`), and policy_loss's clip metrics indexed by a boolean mask."""
import pytest
import torch

import alignkit
import alignkit.ops.validate as validate


def packed(S=4, H=24, V=300, seed=0):
    # sequences of different lengths, each with a masked prompt
    g = torch.Generator().manual_seed(seed)
    lens = [11 + 3 * s for s in range(S)]
    seg = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)])
    N = seg.numel()
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) * 3 / H ** 0.5
    y = torch.randint(0, V, (N,), generator=g)
    starts = torch.tensor([0] + lens).cumsum(0)[:-1]
    for s0 in starts.tolist():
        y[s0:s0 + 4] = -100
    return h, W, y, seg


def compiled_and_eager(f, *leaves):
    out = {}
    for name, fn in (("compiled", torch.compile(f, backend="aot_eager", fullgraph=True)),
                     ("eager", f)):
        for t in leaves:
            t.grad = None
        L, metrics = fn(*leaves)
        L.backward()
        out[name] = (L.detach(), {k: v.detach() for k, v in metrics.items()},
                     [t.grad.clone() for t in leaves])
    return out["compiled"], out["eager"]


def assert_same(c, e):
    torch.testing.assert_close(c[0], e[0], rtol=1e-6, atol=1e-6)
    assert c[1].keys() == e[1].keys()
    for k in e[1]:
        torch.testing.assert_close(c[1][k], e[1][k], rtol=1e-6, atol=1e-6, msg=k)
    for a, b in zip(c[2], e[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def range_checks(monkeypatch):
    # counts the range checks, so a test proves the packed path (not a padded one) was traced
    calls = []
    real = validate.check_segment_range

    def counted(seg, num_segments):
        calls.append(torch.compiler.is_compiling())
        return real(seg, num_segments)
    # one place works out every front door's layout (validate.sequence_layout)
    monkeypatch.setattr(validate, "check_segment_range", counted)
    return calls


@pytest.mark.parametrize("loss,opts", [
    ("simpo", dict(beta=2.0, gamma=0.5)),
    ("dpo", dict(beta=0.2, grad_mode="single_pass")),
    ("orpo", dict(beta=0.5)),
])
def test_preference_loss_packed_compiles(range_checks, loss, opts):
    torch._dynamo.reset()
    h, W, y, seg = packed(seed=1)
    h, W = h.requires_grad_(), W.requires_grad_()
    kw = dict(opts)
    if loss == "dpo":
        kw["ref_logprobs"] = torch.linspace(-30, -20, 4)

    def f(h, W):
        return alignkit.preference_loss(h * 1.0, W, y, loss=loss, segment_ids=seg,
                                        num_segments=4, **kw)
    c, e = compiled_and_eager(f, h, W)
    assert_same(c, e)
    assert True in range_checks and False in range_checks


def test_sequence_logprobs_packed_compiles(range_checks):
    torch._dynamo.reset()
    h, W, y, seg = packed(seed=2)
    h, W = h.requires_grad_(), W.requires_grad_()

    def f(h, W):
        sums, counts = alignkit.sequence_logprobs(h, W, y, segment_ids=seg, num_segments=4)
        return (sums * torch.arange(1.0, 5.0)).sum(), {"sums": sums, "counts": counts}
    c, e = compiled_and_eager(f, h, W)
    assert_same(c, e)
    assert True in range_checks


@pytest.mark.parametrize("opts", [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.05, entropy_coef=0.01),
    dict(loss_type="grpo", importance_sampling_level="sequence"),          # GSPO
    dict(loss_type="cispo", epsilon_high=1.1),
])
def test_policy_loss_packed_compiles(range_checks, opts):
    # S comes from the per-sequence advantages [S]; old log-probs away from the current ones so
    # that the clip metrics (a min and a max over the sequences with tokens) are not all zero
    torch._dynamo.reset()
    h, W, y, seg = packed(seed=3)
    h, W = h.requires_grad_(), W.requires_grad_()
    g = torch.Generator().manual_seed(4)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    old = (alignkit.linear_token_logprobs(h.detach(), W.detach(), y)
           + 0.4 * torch.randn(y.shape, generator=g))
    kw = dict(opts)
    if kw.get("beta"):
        kw["ref_logprobs"] = old - 0.1

    def f(h, W):
        return alignkit.policy_loss(h * 1.0, W, y, advantages=adv, old_logprobs=old,
                                    segment_ids=seg, **kw)
    c, e = compiled_and_eager(f, h, W)
    assert_same(c, e)
    assert True in range_checks
    if "clip_ratio/low_min" in e[1]:
        assert float(e[1]["clip_ratio/high_max"]) > 0 or float(e[1]["clip_ratio/low_min"]) >= 0


def test_compiled_range_check_still_raises():
    # the range is asserted inside the graph: a bad id refuses the call where it runs
    torch._dynamo.reset()
    h, W, y, seg = packed(seed=5)
    f = torch.compile(lambda h, W, s: alignkit.sequence_logprobs(
        h, W, y, segment_ids=s, num_segments=4)[0], backend="aot_eager", fullgraph=True)
    f(h, W, seg)
    bad = seg.clone()
    bad[7] = 4
    with pytest.raises(RuntimeError, match="segment_ids must be in"):
        f(h, W, bad)
    bad[7] = -1
    with pytest.raises(RuntimeError, match="segment_ids must be in"):
        f(h, W, bad)


def test_compiled_packed_needs_a_static_segment_count():
    torch._dynamo.reset()
    h, W, y, seg = packed(seed=6)
    f = torch.compile(lambda h, W: alignkit.sequence_logprobs(h, W, y, segment_ids=seg)[0],
                      backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="segment count as a static int"):
        f(h, W)
