"""grad_mode='single_pass' (one pair, gradient formed in forward) against the recompute path and
the float64 reference: loss, metrics and the gradients of hidden, weight and bias. Its tile and
keep budgets (defaults, knobs, the kept rows, the memory bound): test_single_pass_budgets.py."""
import pytest
import torch

import alignkit
from alignkit.testing.oracle import oracle_preference_loss

from conftest import BACKENDS, assert_oracle


def pair_inputs(T=37, H=24, V=1000, bias=False, packed=False, seed=0, scale=1.0, pairs=1):
    g = torch.Generator().manual_seed(seed)
    S = 2 * pairs
    h = torch.randn(S, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 3 * scale / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (S, T), generator=g)
    y[:, :5] = -100
    y[pairs, -4:] = -100
    if pairs > 1:
        y[-1, : T // 2] = -100           # pairs of different lengths: the longest goes unscaled
    seg = None
    if packed:                      # [N, H] with sequences of different lengths
        h, y = h.reshape(-1, H)[3:], y.reshape(-1)[3:]
        seg = torch.arange(S).repeat_interleave(T)[3:]
    return h, W, b, y, seg


CASES = [
    ("dpo", dict(beta=0.2), {}),
    ("dpo", dict(beta=0.2, loss_type="cdpo", label_smoothing=0.1), dict(bias=True)),
    ("dpo", dict(beta=0.5, loss_type=["hinge", "robust"], loss_weights=[1.0, 0.3],
                 label_smoothing=0.1), dict(packed=True)),
    ("dpo", dict(beta=0.5, loss_type="ipo"), dict(packed=True, bias=True)),
    ("simpo", dict(beta=2.0, gamma=0.5), dict(bias=True, scale=8.0)),
    ("simpo", dict(beta=2.0, gamma=0.5, softcap=5.0, temperature=0.7), {}),
    # untied: rejected first (forward only), chosen, then rejected scaled
    ("dpo", dict(beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
     dict(bias=True)),
    ("dpo", dict(beta=0.3, loss_type="nca_pair"), dict(packed=True)),
    ("orpo", dict(beta=0.5), dict(bias=True, packed=True)),
    ("cpo", dict(beta=0.5, cpo_alpha=0.7, loss_type="hinge"), {}),
    # several pairs: the longest pair (or its chosen) unscaled, every other sequence scored first
    ("dpo", dict(beta=0.2), dict(pairs=3)),
    ("simpo", dict(beta=2.0, gamma=0.5), dict(pairs=2, packed=True, bias=True)),
    ("dpo", dict(beta=0.5, loss_type="ipo"), dict(pairs=3, packed=True)),
    ("orpo", dict(beta=0.5), dict(pairs=3, bias=True)),
    ("cpo", dict(beta=0.5, cpo_alpha=0.7), dict(pairs=2, packed=True)),
    # tied for one pair, not for two (it sorts chosen and rejected across the batch separately)
    ("dpo", dict(beta=0.3, loss_type="aot_unpaired"), {}),
    ("dpo", dict(beta=0.3, loss_type="aot_unpaired"), dict(pairs=2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,opts,shape", CASES)
def test_single_pass_matches_recompute_and_float64(loss, opts, shape, backend):
    check_single_pass(loss, opts, shape, backend)


def check_single_pass(loss, opts, shape, backend, dtype=torch.float32, device="cpu", tiles=None):
    """Single pass and recompute (both on `backend`, inputs in `dtype` on `device`, with
    `tiles`) against float64: loss and the gradients of hidden, weight and bias within a few
    times the recompute's own error."""
    h64, W64, b64, y, seg = (None if t is None else t.to(device) for t in pair_inputs(**shape))
    B = shape.get("pairs", 1)
    ref_lp = None
    if loss == "dpo":
        ref_lp = -1450.0 + 60 * torch.randn(2 * B, generator=torch.Generator().manual_seed(7))
        ref_lp = ref_lp.to(device)
    # the float64 oracle (alignkit.testing.oracle): full logits, then the registry's loss, via autograd
    h64.requires_grad_(), W64.requires_grad_()
    if b64 is not None:
        b64.requires_grad_()
    want, _ = oracle_preference_loss(h64, W64, y, loss=loss, bias=b64, segment_ids=seg,
                                     num_segments=2 * B if seg is not None else None,
                                     ref_logprobs=ref_lp, **opts)
    want.backward()
    want64 = (want.detach(), None, h64.grad, W64.grad, None if b64 is None else b64.grad)
    runs = {}
    for mode in ("recompute", "single_pass"):
        h = h64.detach().to(dtype).requires_grad_()
        W = W64.detach().to(dtype).requires_grad_()
        b = b64.detach().to(dtype).requires_grad_() if b64 is not None else None
        out, m = alignkit.preference_loss(h, W, y, loss=loss, bias=b, segment_ids=seg,
                                          ref_logprobs=ref_lp, grad_mode=mode, backend=backend,
                                          tiles=tiles, **opts)
        out.backward()
        runs[mode] = (out.detach(), m, h.grad, W.grad, None if b is None else b.grad)
    rec, sp = runs["recompute"], runs["single_pass"]
    # each against float64, within a few times the recompute path's own error in that dtype
    for i, name in ((0, "loss"), (2, "hidden"), (3, "weight"), (4, "bias")):
        if rec[i] is not None:
            assert sp[i].abs().sum() > 0, name
            assert_oracle(f"{loss} {name}", sp[i], want64[i], rec[i])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for k in rec[1]:
        torch.testing.assert_close(sp[1][k], rec[1][k], **tol, msg=k)


@pytest.mark.parametrize("pairs", [1, 2])
@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_fully_masked_response_is_finite(loss, pairs):
    h, W, b, y, _ = pair_inputs(pairs=pairs)
    y[pairs] = -100                     # the first pair's rejected response
    h, W = h.float().requires_grad_(), W.float().requires_grad_()
    out, m = alignkit.preference_loss(h, W, y, loss=loss, grad_mode="single_pass")
    out.backward()
    assert out.isfinite() and h.grad.isfinite().all() and W.grad.isfinite().all()
    assert h.grad[pairs].abs().sum() == 0
    h2 = h.detach().clone().requires_grad_()
    want, _ = alignkit.preference_loss(h2, W.detach(), y, loss=loss, grad_mode="recompute")
    want.backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad_mode", ["single_pass", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("front", ["simpo", "dapo"])
def test_grad_w_with_no_labelled_token_is_zero(front, dtype, grad_mode):
    """grad_W's accumulator is not zero-filled up front (its first GEMM writes it), in the
    single pass and in the recompute's backward: with no labelled token nothing writes it, and
    it must still come back exactly zero. A freed [V, H] block of NaN right before the call is
    what an unzeroed accumulator would return here."""
    V, H = 40, 16
    h = torch.randn(2, 6, H, dtype=dtype, requires_grad=True)
    W = torch.randn(V, H, dtype=dtype, requires_grad=True)
    y = torch.full((2, 6), -100)
    junk = torch.full((V, H), float("nan"))
    del junk
    if front == "simpo":
        loss, _ = alignkit.preference_loss(h, W, y, loss="simpo", grad_mode=grad_mode)
    else:
        loss, _ = alignkit.policy_loss(h, W, y, advantages=torch.ones(2), grad_mode=grad_mode)
    loss.backward()
    assert torch.equal(W.grad, torch.zeros_like(W)) and torch.equal(h.grad, torch.zeros_like(h))


def test_single_pass_refuses_mixed_dtypes_and_unknown_modes():
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(4, 9, 16, generator=g), torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (4, 9), generator=g)
    with pytest.raises(ValueError, match="must share one dtype"):
        alignkit.preference_loss(h[:2], W.bfloat16(), y[:2], loss="simpo",
                                 grad_mode="single_pass")
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        alignkit.preference_loss(h, W, y, loss="simpo", grad_mode="fast")
    # auto falls back to recompute where single pass cannot serve
    loss, _ = alignkit.preference_loss(h, W.double(), y, loss="simpo", grad_mode="auto")
    assert loss.isfinite()


def _grads_of(fn, *ts):
    for t in ts:
        t.grad = None
    out = fn()
    return out, [t.grad.clone() if t.grad is not None else None for t in ts]


@pytest.mark.parametrize("grad_mode", ["single_pass", "recompute"])
@pytest.mark.parametrize("loss,opts", [("simpo", dict(beta=2.0, gamma=0.5)),
                                       ("orpo", dict(beta=0.5))])
def test_a_second_backward_accumulates(grad_mode, loss, opts):
    h, W, b, y, _ = pair_inputs(bias=True, seed=21)
    h, W, b = (t.float().requires_grad_() for t in (h, W, b))
    L, _ = alignkit.preference_loss(h, W, y, bias=b, loss=loss, grad_mode=grad_mode, **opts)
    L.backward(retain_graph=True)
    once = [t.grad.clone() for t in (h, W, b)]
    (3.0 * L).backward()                       # a second backward, with another upstream scale
    for g1, t in zip(once, (h, W, b)):
        torch.testing.assert_close(t.grad, 4.0 * g1, rtol=1e-5, atol=1e-6)


def test_default_mode_traces_under_torch_compile_fullgraph():
    h, W, _, y, _ = pair_inputs(seed=22)
    h, W = h.float().requires_grad_(), W.float().requires_grad_()

    def f(h, W, y):
        return alignkit.preference_loss(h * 1.0, W, y, loss="simpo", beta=2.0, gamma=0.5)[0]

    out, grads = _grads_of(lambda: torch.compile(f, backend="aot_eager", fullgraph=True)(
        h, W, y).backward(), h, W)
    _, eager = _grads_of(lambda: f(h, W, y).backward(), h, W)
    for a, e in zip(grads, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss,opts,shape,grad_mode,runs", [
    # auto, one tied pair of padded rows: the pass needs no data to be chosen, so it is traced
    ("simpo", dict(beta=2.0, gamma=0.5), dict(bias=True), "auto", 1),
    ("dpo", dict(beta=0.2, loss_type=("sigmoid", "hinge")), {}, "single_pass", 1),
    # untied, two pairs, 8-row tiles and no keep budget: asked for, the op runs its own
    # schedule (kept rows and rows formed again), with the TileOptions through the spec string
    ("orpo", dict(beta=0.5, tiles=alignkit.TileOptions(single_pass_bytes=8 * 1000 * 4,
                                                       keep_bytes=0)),
     dict(pairs=2, bias=True), "single_pass", 1),
    ("dpo", dict(beta=0.2), dict(pairs=2), "auto", 0),          # auto: the recompute
])
def test_single_pass_traces_under_torch_compile(monkeypatch, loss, opts, shape, grad_mode, runs):
    # the pair pass as the custom op alignkit::pair_pass (alignkit/ops/pass_op.py): the
    # compiled graph's loss and every gradient match the eager single pass, and a counter on
    # the pass proves it ran inside the graph (the recompute would match the values as well)
    import alignkit.ops.pair_pass as sp
    calls = []
    real = sp._grads
    monkeypatch.setattr(sp, "_grads", lambda *a: calls.append(1) or real(*a))
    h, W, b, y, seg = pair_inputs(seed=25, **shape)
    h, W = h.float().requires_grad_(), W.float().requires_grad_()
    b = b.float().requires_grad_() if b is not None else None
    S = 2 * shape.get("pairs", 1)
    kw = dict(opts, grad_mode=grad_mode, bias=b)
    if loss == "dpo":
        kw["ref_logprobs"] = torch.linspace(-30, -20, S)
    if seg is not None:
        kw.update(segment_ids=seg, num_segments=S)

    def f(h, W, b, mode=grad_mode):
        L, m = alignkit.preference_loss(h * 1.0, W, y, loss=loss, **dict(kw, bias=b,
                                                                         grad_mode=mode))
        return L, m["rewards/margins"]

    def run(fn, *args):
        L, margin = fn(h, W, b, *args)
        L.backward()
        return L, margin
    ts = [t for t in (h, W, b) if t is not None]
    torch._dynamo.reset()
    (Lc, mc), gc = _grads_of(lambda: run(torch.compile(f, backend="aot_eager",
                                                         fullgraph=True)), *ts)
    assert len(calls) == runs
    (Le, me), ge = _grads_of(lambda: run(f, "single_pass" if runs else "recompute"), *ts)
    torch.testing.assert_close(Lc, Le, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mc, me, rtol=1e-6, atol=1e-6)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_mode", ["auto", "single_pass", "recompute"])
@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_nan_follows_ieee_arithmetic(grad_mode, loss):
    h, W, _, y, _ = pair_inputs(seed=23)
    h, W = h.float(), W.float()
    h[0, 10, 3] = float("nan")
    kw = dict(ref_logprobs=torch.zeros(2)) if loss == "dpo" else {}
    L, m = alignkit.preference_loss(h.requires_grad_(), W, y, loss=loss, grad_mode=grad_mode,
                                    **kw)
    assert torch.isnan(L)                       # no "not tied as assumed" error
    L.backward()
    if loss == "dpo":                           # NaN in the reference, finite hidden
        L2, _ = alignkit.preference_loss(h.detach().nan_to_num(), W, y, loss="dpo",
                                         grad_mode=grad_mode,
                                         ref_logprobs=torch.tensor([0.0, float("nan")]))
        assert torch.isnan(L2)


def test_no_grad_and_frozen_head_skip_the_accumulator(monkeypatch):
    import alignkit.ops.pair_pass as sp
    calls = []
    real = sp._grads
    monkeypatch.setattr(sp, "_grads", lambda *a: calls.append(a[-3:]) or real(*a))
    h, W, _, y, _ = pair_inputs(seed=24)
    h, W = h.float().requires_grad_(), W.float().requires_grad_()
    with torch.no_grad():                       # auto: forward only, through the generic op
        L0, _ = alignkit.preference_loss(h, W, y, loss="simpo")
    assert calls == []
    W.requires_grad_(False)                     # a frozen head (LoRA on the body): no grad_W
    L1, _ = alignkit.preference_loss(h, W, y, loss="simpo")
    assert calls == [(True, False, False)]
    L1.backward()
    g_single = h.grad.clone()
    h.grad = None
    alignkit.preference_loss(h, W, y, loss="simpo", grad_mode="recompute")[0].backward()
    torch.testing.assert_close(g_single, h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(L0, L1.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,opts,shape", [
    ("simpo", dict(beta=2.0, gamma=0.5), dict(bias=True)),
    ("dpo", dict(beta=0.2), dict(pairs=2, packed=True)),
    ("orpo", dict(beta=0.5), dict(bias=True)),
])
def test_single_pass_bf16(loss, opts, shape, backend):
    """bf16 inputs, both modes with the GEMMs in bf16 where the CPU has bf16 units (fp32
    elsewhere): the single pass against float64 within a few times the recompute's own error in
    bf16 (its logits rounded to bf16 by the same GEMMs: bf16's own error on the same logits)."""
    check_single_pass(loss, opts, shape, backend, dtype=torch.bfloat16)


READS = ("tolist", "item", "__int__", "__bool__", "__float__", "__index__", "nonzero")


@pytest.mark.parametrize("front", ["dpo", "orpo", "gspo"])
def test_one_host_read_per_single_pass(front, monkeypatch):
    """On a card each read of a tensor's value by the host stalls the queue. The single pass
    reads once per forward (the label check with the per-sequence or total labelled counts:
    validate.labelled_per_segment, labelled_rows), every compaction sized by that read
    (nonzero_static), and not at all in backward. Counted on CPU with the card's compaction
    forced: every read of a tensor into Python, and every nonzero()."""
    from alignkit.ops import validate
    monkeypatch.setattr(validate, "_sized", lambda keep: True)
    h, W, _, y, _ = pair_inputs(pairs=2)
    h, W = h.float().requires_grad_(), W.float().requires_grad_()
    reads = []

    def counted(name, real):
        return lambda self, *a, **k: reads.append(name) or real(self, *a, **k)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    ref = torch.randn(4, generator=torch.Generator().manual_seed(5)) - 30

    def run(mode):
        if front == "gspo":            # sequence-level importance sampling: the coupled pass
            return alignkit.policy_loss(h, W, y, advantages=torch.tensor([1.0, -1.0, 0.5, 0.0]),
                                        loss_type="grpo", importance_sampling_level="sequence",
                                        grad_mode=mode)[0]
        return alignkit.preference_loss(h, W, y, loss=front, grad_mode=mode,
                                        ref_logprobs=ref if front == "dpo" else None)[0]
    loss = run("single_pass")
    forward, reads[:] = list(reads), []
    loss.backward()
    assert (forward, reads) == (["tolist"], []), (forward, reads)
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(loss, run("recompute"))
