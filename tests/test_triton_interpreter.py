"""The Triton kernels of the op against the same float64 oracle, where the tensors are: CPU
tensors under the interpreter (TRITON_INTERPRET=1), CUDA tensors on a card (no interpreter). The
single pass's tiles on the same kernels: test_triton_single_pass.py.

The interpreter runs each program in numpy, so shapes are small: odd sizes, block sizes that do
not divide V, H crossing two K blocks, several vocab blocks. CI runs the Triton test files as their
own pytest process with TRITON_INTERPRET=1 (see the Makefile's test target); ``make gpu-check``
runs them on a lent GPU, where the same cases take the paths the interpreter cannot show: the
bf16 tensor-core dot (PRECISION="native"), the bf16 backward's out_dtype GEMMs, several G chunks
under ALIGNKIT_TRITON_G_BYTES, and a tensor on cuda:1 while cuda:0 is current.
"""
import pytest
import torch

import alignkit
from alignkit.testing.oracle import reference_linear_token_logprobs as ref_lin
from alignkit.testing.oracle import reference_token_logprobs as ref_tok
from conftest import TRITON_INTERPRET as INTERPRET
from conftest import assert_oracle, make_inputs, on, triton_devices
from test_linear_logprobs import check_all

pytestmark = triton_devices
triton = pytest.importorskip("triton")


@pytest.fixture(params=["chunked", "atomic", "blocked"])
def mode(request, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    monkeypatch.setenv("ALIGNKIT_TRITON_BWD", request.param)
    if request.param == "chunked":   # several row chunks of G: the CPU budget, and the CUDA one
        monkeypatch.setenv("ALIGNKIT_TILE_BYTES", str(16 * 4099 * 4))
        monkeypatch.setenv("ALIGNKIT_TRITON_G_BYTES", str(16 * 4099 * 4))
    return request.param


@pytest.mark.parametrize("bias", [False, True])
def test_linear_against_oracle(mode, bias, device):
    # N=37 (3 row blocks of 16), H=48 (2 K blocks of 32), V=1000 (16 vocab blocks, ragged last)
    h, W, b, y = make_inputs((37,), 48, 1000, bias=bias, seed=41)
    y[:5] = -100
    check_all(*on(device, h, W, b, y), "triton")


def test_grad_w_needs_no_zero_fill(mode, device):
    # the chunked backward's first chunk writes grad_W and grad_h (no zero fill up front), the
    # atomic modes add into zeros: a freed block of NaN of their size, just before the call, is
    # what an accumulator left unwritten or added into unzeroed would return
    h, W, _, y = make_inputs((37,), 48, 1000, seed=49)
    y[:5] = -100
    h, W, y = on(device, h, W, y)
    h64, W64 = (t.detach().double().requires_grad_() for t in (h, W))
    ref_lin(h64, W64, y).sum().backward()
    for _ in range(2):
        junk = [torch.full(s, float("nan"), device=device) for s in ((1000, 48), (32, 48))]
        del junk
        h.grad = W.grad = None
        alignkit.linear_token_logprobs(h, W, y, backend="triton").sum().backward()
        assert (W.grad.double() - W64.grad).abs().max() < 1e-5
        assert (h.grad.double() - h64.grad).abs().max() < 1e-5


def test_linear_softcap_temperature_and_odd_vocab(mode, device):
    h, W, b, y = make_inputs((2, 9), 40, 4099, bias=True, seed=42)
    y[1] = -100  # a fully ignored row
    check_all(*on(device, h, W, b, y), "triton", softcap=3.0, temperature=0.8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_low_precision(monkeypatch, dtype, device):
    # on a card: bf16 takes the tensor-core dot and the bf16-G backward with out_dtype GEMMs;
    # fp16 keeps G in fp32 (its tail would underflow in fp16)
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    h, W, b, y = make_inputs((19,), 32, 500, dtype=dtype, seed=43)
    check_all(*on(device, h, W, b, y), "triton", factor=2.0)


def test_fp16_gradient_tail_does_not_underflow(monkeypatch, device):
    # Every W row shifted by +5 (the softmax cannot see it) and an averaged loss's small upstream
    # gradient (1e-3 per token): G = g·p_v is below fp16's smallest subnormal (6e-8) for most of
    # the V=20000 tail. grad_h = g·(W_y − Σ_v p_v W_v), where the +5 cancels only if the tail is
    # kept: flushed, grad_h would carry ~5·g·(tail mass) per element against a true ~5e-4.
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    h, W, _, y = make_inputs((8,), 32, 20000, seed=49, ignore_frac=0.0)
    h = h.detach().to(device, torch.float16).requires_grad_()
    W = (W.detach() + 5).to(device, torch.float16).requires_grad_()
    y = y.to(device)
    lp = alignkit.linear_token_logprobs(h, W, y, backend="triton")
    (lp.float().mean() * 8e-3).backward()
    h64, W64 = (t.detach().double().requires_grad_() for t in (h, W))
    (ref_lin(h64, W64, y).mean() * 8e-3).backward()
    err = (h.grad.double() - h64.grad).norm() / h64.grad.norm()
    assert err < 2e-2, err


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() > 1)
                    or INTERPRET, reason="needs two CUDA devices")
def test_tensors_on_the_second_device():
    # cuda:0 current, tensors on cuda:1 (device_map="auto"): every launch runs on cuda:1
    torch.cuda.set_device(0)
    h, W, b, y = make_inputs((37,), 48, 1000, bias=True, seed=50)
    check_all(*on(torch.device("cuda", 1), h, W, b, y), "triton")
    from test_single_pass import check_single_pass
    check_single_pass("simpo", dict(beta=2.0, gamma=0.5), dict(T=19, H=16, V=300), "triton",
                      device="cuda:1")


def test_logits_against_oracle(device):
    g = torch.Generator().manual_seed(44)
    x = torch.randn(2, 7, 3001, generator=g) * 5
    y = torch.randint(0, 3001, (2, 7), generator=g)
    y[0, :3] = -100
    g1, g2 = torch.randn(2, 7, generator=g).double(), torch.randn(2, 7, generator=g).double()
    x, y, g1, g2 = on(device, x, y, g1, g2)

    def run(fn, x_, **kw):
        x_ = x_.detach().clone().requires_grad_()
        lp, ent = fn(x_, y, return_entropy=True, **kw)
        (lp * g1.to(lp.dtype) + ent * g2.to(ent.dtype)).sum().backward()
        return lp, ent, x_.grad
    ours = run(alignkit.token_logprobs, x, backend="triton", temperature=0.9)
    oracle = run(ref_tok, x.double(), temperature=0.9)
    naive = run(ref_tok, x, temperature=0.9)
    for name, a, o, n in zip(("logprobs", "entropy", "grad_logits"), ours, oracle, naive):
        assert_oracle(name, a, o, n)


def test_autotune_opt_in(monkeypatch, device):
    # the tuner's configs are GPU-sized; under the interpreter they run too, on a small case
    monkeypatch.setenv("ALIGNKIT_TRITON_AUTOTUNE", "1")
    from alignkit.kernels import linear_logprobs as K
    if INTERPRET:
        monkeypatch.setattr(K.fwd_partials_tuned, "configs", K.AUTOTUNE_CONFIGS[-1:])
        monkeypatch.setattr(K.bwd_g_chunk_tuned, "configs", K.AUTOTUNE_CONFIGS[-1:])
    h, W, b, y = make_inputs((21,), 64, 300, bias=True, seed=45)
    check_all(*on(device, h, W, b, y), "triton")


def spy_launches(monkeypatch, module, *names):
    """Records (kernel name, grid, keyword arguments, first argument's dtype) per launch."""
    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((self.kernel.fn.__name__, grid, kw, args[0].dtype))
                return self.kernel[grid](*args, **kw)
            return launch
    for name in names:
        monkeypatch.setattr(module, name, Spy(getattr(module, name)))
    return seen


def test_autocast_reaches_the_kernels(monkeypatch, device):
    # fp32 leaves under bf16 autocast: the kernels get bf16 operands (tensor cores on a card),
    # as F.linear's GEMM would, and the gradients come back fp32
    from alignkit.kernels import linear_logprobs as K
    seen = spy_launches(monkeypatch, K, "_fwd_partials", "_bwd_g_chunk")
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    h, W, _, y = make_inputs((21,), 32, 300, seed=54, ignore_frac=0.0)
    h, W, y = on(device, h, W, y)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        lp = alignkit.linear_token_logprobs(h, W, y, backend="triton")
    lp.sum().backward()
    assert [(k, dt) for k, _, _, dt in seen] == [("_fwd_partials", torch.bfloat16),
                                                 ("_bwd_g_chunk", torch.bfloat16)]
    assert seen[0][2]["PRECISION"] == ("native" if device.type == "cuda" else "ieee")
    assert h.grad.dtype == W.grad.dtype == torch.float32
    hb, Wb = (t.detach().bfloat16().requires_grad_() for t in (h, W))
    lp_b = alignkit.linear_token_logprobs(hb, Wb, y, backend="triton")
    lp_b.sum().backward()
    assert torch.equal(lp, lp_b) and torch.equal(W.grad, Wb.grad.float())


def test_a_low_precision_head_keeps_its_dtype(monkeypatch, device):
    # fp32 hidden against a bf16 head: the kernels run in the head's dtype (no fp32 copy of W,
    # no fp32 dots), as the CPU backends and a transformers lm_head do; h's gradient is fp32
    from alignkit.kernels import linear_logprobs as K
    seen = spy_launches(monkeypatch, K, "_fwd_partials")
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    h, W, _, y = make_inputs((21,), 32, 300, seed=56, ignore_frac=0.0)
    h, W, y = on(device, h, W, y)
    Wb = W.detach().bfloat16()
    h = h.detach().requires_grad_()
    lp = alignkit.linear_token_logprobs(h, Wb, y, backend="triton")
    lp.sum().backward()
    assert [dt for _, _, _, dt in seen] == [torch.bfloat16]
    assert h.grad.dtype == torch.float32
    hb = h.detach().bfloat16().requires_grad_()
    lp_b = alignkit.linear_token_logprobs(hb, Wb, y, backend="triton")
    lp_b.sum().backward()
    # the same fp32 gradient, rounded to bf16 for the bf16 leaf only
    assert torch.equal(lp, lp_b) and torch.equal(h.grad.bfloat16(), hb.grad)


@pytest.mark.parametrize("group,H", [(1, 48), (3, 64), (64, 48)])
def test_grouped_grid_covers_every_tile(monkeypatch, group, H, device):
    # the 1-D grouped grid (kernels._tile_index): 5 row blocks x 16 vocab blocks, grouped 1, 3
    # (a ragged last group of one block) and 64 (one group wider than the vocab); H=64 takes the
    # EVEN_K loads, H=48 the masked ones. The merge walks 16 partials in 32-block steps. A tile
    # that no program computes, or two programs computing one, shows in the log-probs.
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", f"16,64,32,{group}")
    monkeypatch.setenv("ALIGNKIT_TRITON_BWD", "chunked")
    h, W, b, y = make_inputs((73,), H, 1000, bias=True, seed=51, ignore_frac=0.0)
    check_all(*on(device, h, W, b, y), "triton")


def test_schedule_follows_device_dtype_and_torch_precision(monkeypatch, device):
    # the launch each kernel gets: fp32 dots exact ("ieee") under torch's default "highest",
    # "tf32" where torch.set_float32_matmul_precision allows it (the interpreter's numpy dot is
    # exact either way; on a card the tolerance below covers tf32's 2^-11 on the logits)
    from alignkit.kernels import linear_logprobs as K
    from alignkit.ops import triton_path as T
    seen = spy_launches(monkeypatch, K, "_fwd_partials", "_bwd_g_chunk")
    h, W, b, y = make_inputs((37,), 64, 300, seed=52, ignore_frac=0.0)
    h, W, y = on(device, h, W, y)
    for prec, want in (("highest", "ieee"), ("high", "tf32")):
        seen.clear()
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(prec)
        try:
            lp = alignkit.linear_token_logprobs(h, W, y, backend="triton")
            lp.sum().backward()
        finally:
            torch.set_float32_matmul_precision(old)
        assert [k for k, _, _, _ in seen] == ["_fwd_partials", "_bwd_g_chunk"]
        for name, grid, kw, _ in seen:
            assert kw["PRECISION"] == want
            assert kw["EVEN_K"] == (64 % kw["BLOCK_K"] == 0)
            sch = T.schedule(h, backward=name == "_bwd_g_chunk")
            assert len(grid) == 1 and grid[0] == -(-37 // sch.block_n) * -(-300 // sch.block_v)
        ref = ref_lin(h.detach().double(), W.detach().double(), y)
        assert (lp.double() - ref).abs().max() < (1e-5 if want == "ieee" else 5e-2)
    assert T.schedule(h.bfloat16()).block_v == 128         # CUDA_LOWP and the interpreter's
    assert T.schedule(h.bfloat16(), backward=True).block_v == (64 if device.type == "cuda" else
                                                              128)
    assert T.precision(h.bfloat16()) == ("native" if device.type == "cuda" else "ieee")


def test_autotune_key_buckets_the_token_count(monkeypatch, device):
    # the tuner's key is (M rounded up to a power of two, V, H): batches of 21 and 30 labelled
    # tokens share one tuning, 40 gets its own (keyed on M itself, each batch would re-tune)
    from alignkit.kernels import linear_logprobs as K
    from alignkit.ops.triton_path import m_bucket
    assert [m_bucket(n) for n in (1, 2, 21, 32, 33, 4096)] == [1, 2, 32, 32, 64, 4096]
    monkeypatch.setenv("ALIGNKIT_TRITON_AUTOTUNE", "1")
    configs = K.AUTOTUNE_CONFIGS[-2:]
    monkeypatch.setattr(K.fwd_partials_tuned, "configs", configs)
    monkeypatch.setattr(K.fwd_partials_tuned, "cache", {})
    if INTERPRET:   # the interpreter cannot time a config (no driver): a fixed ranking instead
        monkeypatch.setattr(K.fwd_partials_tuned, "_bench",
                            lambda *a, config, **kw: [float(configs.index(config))] * 3)
    h, W, _, y = make_inputs((40,), 64, 300, seed=53, ignore_frac=0.0)
    h, W, y = on(device, h, W, y)
    sizes = []
    for n in (21, 30, 40):
        with torch.no_grad():
            lp = alignkit.linear_token_logprobs(h[:n], W, y[:n], backend="triton")
        ref = ref_lin(h[:n].double(), W.double(), y[:n])
        assert (lp.double() - ref).abs().max() < 1e-5
        sizes.append(len(K.fwd_partials_tuned.cache))
    assert sizes == [1, 1, 2]


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="counts host syncs on "
                    "a card")
@pytest.mark.parametrize("front", ["op", "single pass"])
def test_one_host_read_per_pass(front):
    # the op's forward reads the bad-label and labelled counts together (one .tolist()) and
    # compacts with nonzero_static (validate.labelled_rows); its backward compacts with the
    # forward's count, which the op hands it as a CPU scalar: no read at all. The single pass
    # reads the bad-label count with each sequence's labelled count (one .tolist():
    # validate.labelled_per_segment), which size its compactions and choose its unscaled group;
    # its backward only scales. (tests/test_single_pass.py counts the Python-side reads on CPU.)
    import warnings
    h, W, _, y = make_inputs((4, 33), 64, 1000, seed=55)
    y[:, :9] = -100
    h, W, y = on(torch.device("cuda"), h, W, y)
    h.requires_grad_()

    def forward():
        if front == "op":
            return alignkit.linear_token_logprobs(h, W, y, backend="triton").sum()
        return alignkit.preference_loss(h, W, y, loss="simpo", grad_mode="single_pass",
                                        backend="triton")[0]
    forward().backward()                                               # compiled, warm
    torch.cuda.synchronize()
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for step in ("forward", "backward"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if step == "forward":
                    out = forward()
                else:
                    out.backward()
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counts == [1, 0], counts


def test_auto_does_not_pick_triton_on_cpu():
    from alignkit.ops.backends import resolve
    assert resolve("auto", torch.device("cpu")) in ("cpp", "torch")


def test_linear_strided_bias(mode, device):
    # a bias that is a strided view (bias[::2]): the kernels index it with stride 1, so the
    # launcher must hand them a contiguous copy (before the fix: wrong log-probs, max error 3.0)
    h, W, _, y = make_inputs((12,), 16, 50, seed=45)
    big = torch.randn(100, dtype=torch.float64).float().requires_grad_()
    h, W, y, big = on(device, h, W, y, big)
    lp = alignkit.linear_token_logprobs(h, W, y, bias=big[::2], backend="triton")
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3)).to(device)
    (lp * g).sum().backward()
    b64 = big.detach().double()[::2].requires_grad_()
    ref = ref_lin(h.detach().double(), W.detach().double(), y, bias=b64)
    (ref * g.double()).sum().backward()
    assert (lp.double() - ref).abs().max() < 1e-5
    assert (big.grad[::2].double() - b64.grad).abs().max() < 1e-5
    assert torch.all(big.grad[1::2] == 0)


def test_linear_neg_inf_logits(mode, device):
    # a −inf logit: entropy and gradients defined (0·log 0 = 0) on the Triton kernels too
    from test_linear_logprobs import masked_bias_inputs
    h, W, b, y = on(device, *masked_bias_inputs(V=200, seed=46))
    lp, ent = alignkit.linear_token_logprobs(h, W, y, bias=b, return_entropy=True,
                                             backend="triton")
    (lp + ent).sum().backward()
    b64 = b.detach().double().clamp(min=-1e30).requires_grad_()
    h64, W64 = (t.detach().double().requires_grad_() for t in (h, W))
    lp64, ent64 = ref_lin(h64, W64, y, bias=b64, return_entropy=True)
    (lp64 + ent64).sum().backward()
    for ours, theirs in ((lp, lp64), (ent, ent64), (h.grad, h64.grad), (W.grad, W64.grad),
                         (b.grad, b64.grad)):
        assert torch.isfinite(ours).all() and (ours.double() - theirs).abs().max() < 1e-4
