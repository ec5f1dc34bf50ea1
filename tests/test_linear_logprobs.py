"""linear_token_logprobs against the float64 oracle: values and gradients of every input."""
import pytest
import torch

import alignkit
from alignkit.testing.oracle import reference_linear_token_logprobs as ref
from conftest import assert_oracle, make_inputs


def _run(fn, h, W, b, y, g_lp, g_ent, **kw):
    """Returns outputs and the gradients of h, W, b for the weighted sum Σ g_lp·lp + g_ent·ent."""
    hs = [t.detach().clone().requires_grad_() if t is not None else None for t in (h, W, b)]
    out = fn(hs[0], hs[1], y, bias=hs[2], return_entropy=True, **kw)
    lp, ent = out
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return lp, ent, [t.grad if t is not None else None for t in hs]


def check_all(h, W, b, y, backend, factor=4.0, **kw):
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(y.shape, generator=g, dtype=torch.float64).to(h.device)
    g_ent = torch.randn(y.shape, generator=g, dtype=torch.float64).to(h.device)
    tiles = kw.pop("tiles", None)                     # ours only: the oracle has no tiles
    ours = _run(alignkit.linear_token_logprobs, h, W, b, y, g_lp, g_ent, backend=backend,
                tiles=tiles, **kw)
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    oracle = _run(ref, d(h), d(W), d(b), y, g_lp, g_ent, **kw)
    f = lambda t: None if t is None else t.detach().to(h.dtype)  # noqa: E731
    naive = _run(ref, f(h), f(W), f(b), y, g_lp, g_ent, **kw)
    assert ours[0].dtype == torch.float32 and ours[0].shape == y.shape
    ignored = y == -100
    assert torch.all(ours[0][ignored] == 0.0) and torch.all(ours[1][ignored] == 0.0)
    assert_oracle("logprobs", ours[0], oracle[0], naive[0], factor)
    assert_oracle("entropy", ours[1], oracle[1], naive[1], factor)
    for name, a, o, n in zip(("grad_hidden", "grad_weight", "grad_bias"), ours[2], oracle[2], naive[2]):
        if o is None:
            assert a is None
            continue
        assert a.dtype == h.dtype
        assert_oracle(name, a, o, n, factor)


@pytest.mark.parametrize("V", [1000, 5003])
@pytest.mark.parametrize("bias", [False, True])
def test_odd_shapes(backend, V, bias):
    h, W, b, y = make_inputs((3, 37), 129, V, bias=bias, seed=V)
    y[1] = -100  # a fully ignored row
    check_all(h, W, b, y, backend)


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(softcap=4.0),
                                dict(softcap=2.5, temperature=1.7)])
def test_temperature_softcap(backend, kw):
    h, W, b, y = make_inputs((2, 29), 64, 3001, bias=True, seed=7)
    check_all(h, W, b, y, backend, **kw)


def test_large_logits(backend):
    # logits of magnitude ~1e3: the LSE must not overflow and p must stay exact
    h, W, b, y = make_inputs((41,), 48, 2003, scale=300.0, seed=3)
    with torch.no_grad():
        mag = (h.double() @ W.double().t()).abs().max().item()
    assert mag > 500
    check_all(h, W, b, y, backend)


@pytest.mark.parametrize("how", ["option", "environment"])
def test_multiple_chunks_and_vocab_blocks(backend, monkeypatch, how):
    # tiny budget: many token chunks and vocab blocks, a ragged last block; the knobs given as
    # TileOptions in the call, or as the environment's defaults
    kw = {}
    if how == "option":
        kw["tiles"] = alignkit.TileOptions(tile_bytes=40 * 1024, vocab_block=256)
    else:
        monkeypatch.setenv("ALIGNKIT_TILE_BYTES", str(40 * 1024))
        monkeypatch.setenv("ALIGNKIT_VOCAB_BLOCK", "256")
    calls = []
    import alignkit.ops.tiling as tiling
    real = tiling.plan
    monkeypatch.setattr(tiling, "plan", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    h, W, b, y = make_inputs((3, 37), 33, 1531, bias=True, seed=11)
    check_all(h, W, b, y, backend, **kw)
    check_all(h, W, b, y, backend, softcap=3.0, temperature=0.8, **kw)
    assert calls and all(p.vocab_block == 256 and p.rows < 111 for p in calls)


@pytest.mark.parametrize("tiles", [None, alignkit.TileOptions(tile_bytes=24 << 10,
                                                               vocab_block=256)])
def test_bf16_inputs(backend, tiles):
    # tiles: one chunk and the vocabulary whole, or several chunks of rows under several vocab
    # blocks (a ragged last one): with bf16 GEMMs the backward's vocab-outer order then sums each
    # grad_W block over the chunks in fp32
    h, W, b, y = make_inputs((2, 19), 40, 1000, dtype=torch.bfloat16, bias=True, seed=5)
    check_all(h, W, b, y, backend, factor=2.0, tiles=tiles)


def test_fp16_inputs(backend):
    h, W, b, y = make_inputs((23,), 40, 777, dtype=torch.float16, seed=6)
    check_all(h, W, b, y, backend, factor=2.0)


def test_no_grad_keeps_nothing(backend):
    h, W, _, y = make_inputs((4, 16), 32, 500, seed=9)
    with torch.no_grad():
        lp = alignkit.linear_token_logprobs(h, W, y, backend=backend)
    assert lp.grad_fn is None
    ref_lp = ref(h.detach().double(), W.detach().double(), y)
    assert (lp.double() - ref_lp).abs().max() < 1e-5


def test_only_some_inputs_need_grad(backend):
    h, W, _, y = make_inputs((5, 7), 16, 300, seed=12)
    W = W.detach()  # frozen head: no grad_W is computed
    lp = alignkit.linear_token_logprobs(h, W, y, backend=backend)
    lp.sum().backward()
    hd = h.detach().double().requires_grad_()
    ref(hd, W.double(), y).sum().backward()
    assert W.grad is None
    assert (h.grad.double() - hd.grad).abs().max() < 1e-5


def test_empty_batch(backend):
    h = torch.randn(0, 16, requires_grad=True)
    W = torch.randn(50, 16, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    lp = alignkit.linear_token_logprobs(h, W, y, backend=backend)
    assert lp.shape == (0,)
    lp.sum().backward()
    assert h.grad.shape == (0, 16) and torch.all(W.grad == 0)


def test_all_ignored(backend):
    h, W, _, y = make_inputs((2, 5), 8, 40, seed=2)
    y[:] = -100
    lp, ent = alignkit.linear_token_logprobs(h, W, y, backend=backend, return_entropy=True)
    assert torch.all(lp == 0) and torch.all(ent == 0)
    (lp.sum() + ent.sum()).backward()
    assert torch.all(h.grad == 0) and torch.all(W.grad == 0)


def test_custom_ignore_index(backend):
    h, W, _, y = make_inputs((20,), 8, 40, ignore_frac=0.0, seed=4)
    y[::3] = 7  # 7 is a real token id, but here it is the ignore value
    lp = alignkit.linear_token_logprobs(h, W, y, ignore_index=7, backend=backend)
    r = ref(h.detach().double(), W.detach().double(), y, ignore_index=7)
    assert torch.all(lp[::3] == 0)
    assert (lp.double() - r).abs().max() < 1e-5


def test_nonfinite_propagates(backend):
    """Documented: NaN/Inf are not checked; they follow IEEE arithmetic to the tokens they touch."""
    h, W, _, y = make_inputs((6,), 8, 30, ignore_frac=0.0, seed=8)
    y[5] = -100
    h = h.detach().clone()
    h[2, 3] = float("nan")
    h[5, 0] = float("inf")  # ignored position: never goes through W
    lp = alignkit.linear_token_logprobs(h, W.detach(), y, backend=backend)
    assert torch.isnan(lp[2])
    assert lp[5] == 0.0
    assert torch.isfinite(lp[[0, 1, 3, 4]]).all()
    W2 = W.detach().clone()
    W2[11, 0] = float("nan")
    lp2 = alignkit.linear_token_logprobs(h[[0, 1]], W2, y[[0, 1]], backend=backend)
    assert torch.isnan(lp2).all()
    # a logit of -inf is a probability of 0, not an error: the other tokens stay exact
    W3 = W.detach().clone()
    W3[11] = 0.0
    W3[11, 0] = float("inf")
    h3 = h[[0, 1]].clone()
    h3[:, 0] = -1.0
    y3 = y[[0, 1]].clone()
    y3[y3 == 11] = 12
    lp3 = alignkit.linear_token_logprobs(h3, W3, y3, backend=backend)
    W3f = W3.clone()
    W3f[11, 0] = 1e30  # a -1e30 logit stands in for -inf: exp underflows to 0 in float64 too
    r3 = ref(h3.double(), W3f.double(), y3)
    assert torch.isfinite(lp3).all() and (lp3.double() - r3).abs().max() < 1e-5


def test_backends_agree():
    if not alignkit.cpp_available():
        pytest.skip("C++ extension not built; CI asserts it is (tests/test_cpp_extension.py)")
    h, W, b, y = make_inputs((3, 37), 129, 1000, bias=True, seed=13)
    a = alignkit.linear_token_logprobs(h, W, y, bias=b, backend="torch")
    c = alignkit.linear_token_logprobs(h, W, y, bias=b, backend="cpp")
    assert (a - c).abs().max() < 1e-5


def test_module_form():
    h, W, _, y = make_inputs((3, 5), 8, 40, seed=14)
    mod = alignkit.LinearTokenLogprobs(temperature=0.5)
    lp = mod(h, W, y)
    assert torch.equal(lp, alignkit.linear_token_logprobs(h, W, y, temperature=0.5))


def test_torch_compile():
    h, W, _, y = make_inputs((2, 9), 16, 100, seed=15)

    def loss_fn(h, W, y):
        lp = alignkit.linear_token_logprobs(h * 2.0, W, y)
        return (lp.sum(-1) ** 2).mean()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    out = compiled(h, W, y)
    out.backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    ref_out = loss_fn(h, W, y)
    ref_out.backward()
    assert torch.allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gh, h.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gW, W.grad, rtol=1e-5, atol=1e-6)


def test_memory_budget(backend, monkeypatch):
    """fwd+bwd peak ≤ 1.3·(grad_W + grad_h) + tile budget; no-grad forward ≤ budget + outputs."""
    from alignkit.bench.profiling import peak_memory_bytes
    budget = 2 * 2**20
    monkeypatch.setenv("ALIGNKIT_TILE_BYTES", str(budget))
    S, T, H, V = 4, 256, 64, 8000
    h, W, _, y = make_inputs((S, T), H, V, dtype=torch.float32, seed=31)
    grads = (V * H + S * T * H) * 4
    logits = S * T * V * 4

    def step():
        h.grad = W.grad = None
        alignkit.linear_token_logprobs(h, W, y, backend=backend).sum().backward()
    peak = peak_memory_bytes(step)
    assert grads <= peak <= 1.3 * grads + budget, (peak, grads)
    assert peak < logits / 2
    with torch.no_grad():
        fwd = peak_memory_bytes(lambda: alignkit.linear_token_logprobs(h, W, y, backend=backend))
    assert 0 < fwd <= budget + 8 * S * T * 4, fwd


def masked_bias_inputs(V=300, seed=16):
    """Logits of −inf at some columns (a bias that masks tokens), never at a label."""
    h, W, b, y = make_inputs((3, 11), 20, V, bias=True, seed=seed)
    b = b.detach().clone()
    masked = torch.arange(5, V, 7)
    b[masked] = float("-inf")
    y[torch.isin(y, masked)] = 4
    return h, W, b.requires_grad_(), y


def test_neg_inf_logits_give_defined_entropy_and_gradients(backend):
    """0·log 0 = 0: a −inf logit adds nothing to the entropy, and its gradients are 0, not NaN.
    The oracle runs with −1e30 standing in for −inf (exp underflows to exactly 0 in float64)."""
    h, W, b, y = masked_bias_inputs()
    lp, ent = alignkit.linear_token_logprobs(h, W, y, bias=b, return_entropy=True,
                                             backend=backend)
    g = torch.Generator().manual_seed(2)
    (lp * torch.randn(lp.shape, generator=g)).sum().backward(retain_graph=True)
    gh1, gW1, gb1 = h.grad.clone(), W.grad.clone(), b.grad.clone()
    for t in (h, W, b):
        t.grad = None
    (lp + ent).sum().backward()
    b64 = b.detach().double().clamp(min=-1e30).requires_grad_()
    h64, W64 = (t.detach().double().requires_grad_() for t in (h, W))
    lp64, ent64 = ref(h64, W64, y, bias=b64, return_entropy=True)
    (lp64 + ent64).sum().backward()
    for name, ours, theirs in (("logprobs", lp, lp64), ("entropy", ent, ent64),
                               ("grad_hidden", h.grad, h64.grad),
                               ("grad_weight", W.grad, W64.grad), ("grad_bias", b.grad, b64.grad)):
        assert torch.isfinite(ours).all(), name
        assert (ours.double() - theirs).abs().max() < 1e-4, name
    assert torch.isfinite(gh1).all() and torch.isfinite(gW1).all() and torch.isfinite(gb1).all()
    # 0 (torch), or below 1e-30 (cpp, whose exp flattens at exp(-87) ~ 1.6e-38)
    assert b.grad[torch.arange(5, 300, 7)].abs().max() < 1e-30


def test_default_tile_budget_grows_with_a_big_head(monkeypatch):
    """The default tile_bytes is max(16 MiB, grad_W / 16) for the op's weight; an explicit budget
    (argument or ALIGNKIT_TILE_BYTES) is taken as given; the launcher passes the weight's shape."""
    from alignkit.ops.options import TileOptions
    monkeypatch.delenv("ALIGNKIT_TILE_BYTES", raising=False)
    assert TileOptions().resolved(head=(128256, 4096)).tile_bytes == 128256 * 4096 * 4 // 16
    assert TileOptions().resolved(head=(32000, 1024)).tile_bytes == 16 << 20
    assert TileOptions(tile_bytes=1 << 20).resolved(head=(128256, 4096)).tile_bytes == 1 << 20
    monkeypatch.setenv("ALIGNKIT_TILE_BYTES", str(2 << 20))
    assert TileOptions().resolved(head=(128256, 4096)).tile_bytes == 2 << 20
    monkeypatch.delenv("ALIGNKIT_TILE_BYTES")
    seen = []
    real = TileOptions.resolved
    monkeypatch.setattr(TileOptions, "resolved",
                        lambda self, head=None: seen.append(head) or real(self, head))
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    alignkit.linear_token_logprobs(h, w, torch.randint(0, 11, (5,))).sum().backward()
    assert (11, 8) in seen
    # the front doors' recompute path reaches the same launcher
    for call in (lambda: alignkit.preference_loss(h[:4].view(2, 2, 8), w,
                                                  torch.randint(0, 11, (2, 2)), loss="simpo",
                                                  grad_mode="recompute"),
                 lambda: alignkit.policy_loss(h.view(1, 5, 8), w, torch.randint(0, 11, (1, 5)),
                                              advantages=torch.ones(1), loss_type="grpo",
                                              grad_mode="recompute")):
        seen.clear()
        call()[0].backward()
        assert (11, 8) in seen


def test_a_low_precision_grad_w_is_never_held_in_fp32():
    """Where the GEMMs run in bf16, grad_W is finished a vocab block at a time and written in
    bf16: one chunk of rows straight from its GEMM, several chunks through one fp32
    [vocab_block, H] block. No [V, H] fp32 accumulator (V·H·4 bytes, twice the gradient) is
    made, so neither peak reaches bf16 grad_W plus half of one (the accumulator alone would
    exceed it), and the two schedules agree to bf16 rounding."""
    from alignkit.bench.profiling import peak_memory_bytes
    from alignkit.ops.backends import gemm_dtype
    if gemm_dtype(torch.bfloat16, torch.device("cpu")) != torch.bfloat16:
        pytest.skip("this CPU runs bf16 GEMMs in fp32")
    V, H, N = 4096, 256, 48
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(V, H, generator=g) / 16).bfloat16().requires_grad_()
    h = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    calls = []
    import alignkit.ops.tiling as tiling
    real = tiling.plan

    def run(**kw):
        w.grad = h.grad = None
        alignkit.linear_token_logprobs(h, w, y, **kw).sum().backward()
    several = alignkit.TileOptions(tile_bytes=64 << 10, vocab_block=512)
    grads = {}
    for name, kw in (("one", {}), ("several", dict(tiles=several))):
        run(**kw)
        w.grad = h.grad = None
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tiling, "plan", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
            peak = peak_memory_bytes(lambda: run(**kw))
        assert w.grad.dtype == torch.bfloat16
        assert peak < V * H * 2 + V * H * 2, (name, peak)
        grads[name] = (calls[-1], w.grad.float(), h.grad.float())
    (p1, w1, h1), (p2, w2, h2) = grads["one"], grads["several"]
    assert p1.rows >= N and p2.rows < N and p2.vocab_block == 512   # the schedules asked for
    torch.testing.assert_close(w1, w2, rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(h1, h2, rtol=2 ** -7, atol=1e-3)


# big enough that the GEMMs' own workspaces (~1 MB) do not decide it. The first shape was 1.9x
# the bound with an fp32 [V, H] accumulator and its cast (0.87 now); the second 1.03x with grad_h
# summed over every row in fp32 and the fp32 grad_W block outside the tile budget (0.94 now)
@pytest.mark.parametrize("V,H,N,budget", [(32768, 128, 2000, 2 << 20),
                                          (32000, 128, 8000, 4 << 20)])
def test_a_low_precision_backward_stays_within_the_memory_bound(V, H, N, budget):
    """bf16 GEMMs, several chunks of rows: the peak of fwd+bwd stays within 1.3 x (grad_W +
    grad_h) + the tile budget, with the gradients at their own (bf16) size: grad_W summed a vocab
    block at a time, grad_h over the labelled rows only, the fp32 block inside the budget."""
    from alignkit.bench.profiling import peak_memory_bytes
    from alignkit.ops.backends import gemm_dtype
    if gemm_dtype(torch.bfloat16, torch.device("cpu")) != torch.bfloat16:
        pytest.skip("this CPU runs bf16 GEMMs in fp32")
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(V, H, generator=g) / 8).bfloat16().requires_grad_()
    h = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[: N // 4] = -100                                     # a masked prompt
    tiles = alignkit.TileOptions(tile_bytes=budget, vocab_block=1024)

    def run():
        w.grad = h.grad = None
        alignkit.linear_token_logprobs(h, w, y, tiles=tiles).sum().backward()
    run()
    peak = peak_memory_bytes(run)
    bound = 1.3 * (V * H * 2 + N * H * 2) + budget
    assert w.grad.dtype == h.grad.dtype == torch.bfloat16
    assert peak <= bound, (peak, bound)
