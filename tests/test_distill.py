"""alignkit.distill_loss against the float64 oracle from full logits (alignkit.testing.oracle), and
against TRL 1.16's ChunkedDivergenceFunction: loss, entropy and every student gradient, both
plans, beta 0 / 0.5 / 1, temperature != 1, odd shapes, different hidden sizes, ignored labels,
large logits; the plan choice, the frozen teacher and the errors."""
import pytest
import torch

import alignkit
from alignkit.testing.oracle import oracle_distill_loss
from alignkit.ops import distill_pass
from alignkit.ops import plan as plan_mod
from conftest import assert_oracle

BETAS = [0.0, 0.5, 1.0]
PLANS = ["single_pass", "recompute"]


def inputs(shape=(3, 7), Hs=13, Ht=9, V=37, scale=1.0, bias=True, seed=0, ignore=0.3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hs, ht = r(*shape, Hs), r(*shape, Ht)
    ws, wt = r(V, Hs) * scale / Hs ** 0.5 * 3, r(V, Ht) * scale / Ht ** 0.5 * 3
    bs, bt = (r(V), r(V)) if bias else (None, None)
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore] = -100
    return hs, ws, bs, ht, wt, bt, y


def small_tiles(plan, V=37, rows=2, vb=16):
    """Tiles of `rows` labelled rows and vocab blocks of `vb` columns, so every call runs several
    chunks, each over several blocks (a ragged last one)."""
    b = 4 * (2 * V + 3 * vb) * rows
    return alignkit.TileOptions(plan=plan, single_pass_bytes=b, tile_bytes=b, vocab_block=vb)


def ours(hs, ws, bs, ht, wt, bt, y, dtype, **kw):
    leaves = [None if x is None else x.to(dtype).requires_grad_() for x in (hs, ws, bs)]
    loss, m = alignkit.distill_loss(leaves[0], leaves[1], ht.to(dtype), wt.to(dtype), y,
                                    student_bias=leaves[2],
                                    teacher_bias=None if bt is None else bt.to(dtype), **kw)
    want = [x for x in leaves if x is not None]
    # an upstream gradient other than 1: each plan's backward scales by it
    return loss, m, [g / 2.5 for g in torch.autograd.grad(loss * 2.5, want)]


def oracle(hs, ws, bs, ht, wt, bt, y, dtype=torch.float64, **kw):
    kw.pop("tiles", None)
    leaves = [None if x is None else x.to(dtype).requires_grad_() for x in (hs, ws, bs)]
    loss, m = oracle_distill_loss(leaves[0], leaves[1], ht.to(dtype), wt.to(dtype), y,
                                  student_bias=leaves[2],
                                  teacher_bias=None if bt is None else bt.to(dtype), **kw)
    return loss, m, torch.autograd.grad(loss, [x for x in leaves if x is not None])


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("beta", BETAS + [0.1])
def test_float64_matches_oracle(beta, plan):
    """float64 in, float64 tiles: the pass is the definition to rounding (odd shapes, H_s != H_t,
    biases, temperature, ignored labels, several tiles)."""
    x = inputs(seed=int(beta * 10) + 3 * PLANS.index(plan))
    kw = dict(beta=beta, temperature=0.7, tiles=small_tiles(plan))
    before = distill_pass.CALLS[plan]
    l1, m1, g1 = ours(*x, torch.float64, **kw)
    assert distill_pass.CALLS[plan] == before + 1
    l0, m0, g0 = oracle(*x, **kw)
    assert float(l1.detach()) == pytest.approx(float(l0.detach()), rel=1e-12, abs=1e-13)
    assert float(m1["entropy"]) == pytest.approx(float(m0["entropy"]), rel=1e-12)
    for a, b in zip(g1, g0):
        assert (a - b).abs().max() <= 1e-11 * max(b.abs().max(), 1e-3)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("case", ["odd", "large_logits", "no_bias_3d", "num_items"])
def test_float32_matches_oracle(beta, plan, case):
    """fp32 within a few times torch's own fp32 error (full logits, autograd) of float64."""
    cfg = dict(odd=dict(), large_logits=dict(scale=30.0, seed=1),
               no_bias_3d=dict(shape=(2, 3, 5), bias=False, Hs=8, Ht=17, V=50, seed=2),
               num_items=dict(seed=3))[case]
    x = inputs(**cfg)
    kw = dict(beta=beta, temperature=1.0 if case == "large_logits" else 1.3,
              tiles=small_tiles(plan, V=x[1].shape[0]))
    if case == "num_items":
        kw["num_items"] = torch.tensor(40.0)
    l1, m1, g1 = ours(*x, torch.float32, **kw)
    l0, m0, g0 = oracle(*x, **kw)
    ln, mn, gn = oracle(*x, dtype=torch.float32, **kw)
    assert_oracle("loss", l1.reshape(1), l0.reshape(1), ln.reshape(1))
    assert_oracle("entropy", m1["entropy"].reshape(1), m0["entropy"].reshape(1),
                  mn["entropy"].reshape(1))
    for name, a, b, c in zip(("student_hidden", "student_weight", "student_bias"), g1, g0, gn):
        assert_oracle(name, a, b, c)


@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl_chunked_divergence(beta):
    """TRL's own ChunkedDivergenceFunction (its torch path on CPU), fp32: the beta conventions,
    the temperature and the gradients are TRL's."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    hs, ws, bs, ht, wt, bt, y = inputs(shape=(19,), ignore=0.0, seed=7)
    f = lambda t: t.float()  # noqa: E731
    leaves = [f(t).requires_grad_() for t in (hs, ws, bs)]
    div, ent = ChunkedDivergenceFunction.apply(leaves[0], leaves[1], leaves[2], f(ht), f(wt),
                                               f(bt), beta, 0.8)
    g_trl = torch.autograd.grad(div.mean(), leaves)
    l1, m1, g1 = ours(hs, ws, bs, ht, wt, bt, y, torch.float32, beta=beta, temperature=0.8)
    assert float(l1) == pytest.approx(float(div.mean()), rel=1e-5, abs=1e-6)
    assert float(m1["entropy"]) == pytest.approx(float(ent.mean()), rel=1e-5)
    for a, b in zip(g1, g_trl):
        assert (a - b).abs().max() <= 1e-5 * max(b.abs().max(), 1e-4)


def test_no_labelled_token_gives_zero():
    hs, ws, bs, ht, wt, bt, y = inputs()
    y[:] = -100
    for plan in PLANS:
        loss, m, g = ours(hs, ws, bs, ht, wt, bt, y, torch.float32,
                          tiles=alignkit.TileOptions(plan=plan))
        assert float(loss) == 0.0 and float(m["entropy"]) == 0.0
        assert all(float(t.abs().max()) == 0.0 for t in g)


def test_teacher_is_frozen_and_plans_are_chosen_by_memory():
    """No gradient reaches the teacher even where it requires one; memory="min" takes the
    recompute (its tiles of tile_bytes, shorter than the single pass's), the default the single
    pass, no_grad the forward alone (CALLS counts each)."""
    hs, ws, bs, ht, wt, bt, y = inputs()
    s = [t.float().requires_grad_() for t in (hs, ws)]
    t = [t.float().requires_grad_() for t in (ht, wt)]
    for memory, plan in (("min", "recompute"), (None, "single_pass")):
        before = distill_pass.CALLS[plan]
        loss, _ = alignkit.distill_loss(s[0], s[1], t[0], t[1], y, beta=0.5,
                                        tiles=alignkit.TileOptions(memory=memory,
                                                                   tile_bytes=4 * 5 * 37 * 2,
                                                                   vocab_block=16))
        assert distill_pass.CALLS[plan] == before + 1
        assert plan_mod.LAST[0].plan == plan
        loss.backward()
        assert t[0].grad is None and t[1].grad is None
        assert s[0].grad is not None
    before = distill_pass.CALLS["forward"]
    with torch.no_grad():
        alignkit.distill_loss(s[0], s[1], t[0], t[1], y)
    assert distill_pass.CALLS["forward"] == before + 1


def test_second_backward_forms_the_gradients_again():
    hs, ws, bs, ht, wt, bt, y = inputs()
    h = hs.clone().requires_grad_()
    loss, _ = alignkit.distill_loss(h, ws, ht, wt, y, beta=0.5,
                                    tiles=alignkit.TileOptions(plan="single_pass"))
    g1, = torch.autograd.grad(loss, h, retain_graph=True)
    g2, = torch.autograd.grad(3 * loss, h)
    torch.testing.assert_close(g2, 3 * g1)


@pytest.mark.parametrize("kw,match", [
    (dict(wt=torch.zeros(36, 9, dtype=torch.float64)), "student_weight and teacher_weight must "
                                                       "share the vocabulary"),
    (dict(ht=torch.zeros(3, 6, 9, dtype=torch.float64)), "teacher_hidden must have"),
    (dict(ht=torch.zeros(3, 7, 8, dtype=torch.float64)), "teacher_hidden must be"),
    (dict(y=torch.zeros(3, 6, dtype=torch.long)), "labels must have shape"),
    (dict(beta=1.5), "beta must be"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(bt=torch.zeros(36, dtype=torch.float64)), "teacher_bias must have shape"),
    (dict(num_items=0), "num_items must be"),
    (dict(tiles="fast"), "tiles must be"),
    (dict(ws=torch.zeros(37, 13), bs=None), "student_hidden and student_weight must share one "
                                            "dtype"),
])
def test_bad_input_is_refused_by_name(kw, match):
    hs, ws, bs, ht, wt, bt, y = inputs()
    a = dict(hs=hs, ws=ws, ht=ht, wt=wt, y=y, bs=bs, bt=bt)
    opts = {k: kw.pop(k) for k in ("beta", "temperature", "num_items", "tiles") if k in kw}
    a.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        alignkit.distill_loss(a["hs"], a["ws"], a["ht"], a["wt"], a["y"], student_bias=a["bs"],
                              teacher_bias=a["bt"], **opts)


@pytest.mark.parametrize("gemm", ["fp32", "bf16"])
@pytest.mark.parametrize("plan", PLANS)
def test_bf16_heads_on_cpu(plan, gemm, monkeypatch):
    """bf16 heads on CPU: W converted a vocab block at a time, the GEMMs in fp32, or in bf16
    where the CPU has bf16 units (forced here); against float64 on the bf16-rounded inputs, to
    bf16's precision (the bf16 GEMMs round their outputs)."""
    from alignkit.ops import distill_gemms
    if gemm == "bf16":
        monkeypatch.setattr(distill_gemms, "gemm_dtype", lambda dt, dev: torch.bfloat16)
    x = [None if t is None else t.to(torch.bfloat16).double() for t in inputs(seed=5)[:6]]
    y = inputs(seed=5)[6]
    kw = dict(beta=0.5, temperature=1.2, tiles=small_tiles(plan))
    l1, m1, g1 = ours(*x, y, torch.bfloat16, **kw)
    l0, m0, g0 = oracle(*x, y, **kw)
    tol = 2e-2 if gemm == "bf16" else 1e-5
    assert float(l1.detach()) == pytest.approx(float(l0.detach()), rel=tol)
    for a, b in zip(g1, g0):
        assert a.dtype == torch.bfloat16
        # handed back in bf16, then divided by ours()' upstream 2.5 in bf16: two roundings of
        # bf16's unit roundoff 2^-8 on top of the GEMMs' error
        assert (a.double() - b).abs().max() <= (tol + 2 ** -7) * b.abs().max()


def test_a_byte_cap_takes_the_single_pass_where_it_fits_else_the_recompute():
    hs, ws, bs, ht, wt, bt, y = inputs()               # 21 rows, V=37, H_s=13
    h = hs.float().requires_grad_()
    acc = 37 * 13 * 4 + 21 * 13 * 4                    # grad_W_s and grad_h_s, fp32
    per_row = 4 * (2 * 37 + 3 * 16)                    # two [rows, V] tiles, three blocks
    sp, rc = acc + 21 * per_row, acc + 2 * per_row     # 21 rows against tile_bytes' 2

    def run(cap):
        t = alignkit.TileOptions(memory=cap, tile_bytes=2 * per_row, vocab_block=16)
        return alignkit.distill_loss(h, ws.float(), ht.float(), wt.float(), y, tiles=t)
    for cap, plan in ((sp, "single_pass"), (sp - 1, "recompute"), (rc, "recompute")):
        run(cap)
        assert plan_mod.LAST[0].plan == plan, cap
    with pytest.raises(ValueError, match="memory=.* is below the recompute's"):
        run(rc - 1)


def test_a_bf16_teacher_beside_an_fp32_student():
    """The heads' dtypes are their own: a bf16 teacher (its GEMMs as bf16 heads on CPU take
    them) beside an fp32 student, against float64 on the bf16-rounded teacher."""
    hs, ws, bs, ht, wt, bt, y = inputs(seed=9)
    ht, wt, bt = (t.to(torch.bfloat16) for t in (ht, wt, bt))
    leaves = [t.float().requires_grad_() for t in (hs, ws, bs)]
    l1, _ = alignkit.distill_loss(leaves[0], leaves[1], ht, wt, y, student_bias=leaves[2],
                                  teacher_bias=bt, beta=0.5)
    g1 = torch.autograd.grad(l1, leaves)
    l0, _, g0 = oracle(hs, ws, bs, ht.double(), wt.double(), bt.double(), y, beta=0.5)
    assert float(l1.detach()) == pytest.approx(float(l0.detach()), rel=1e-5)
    for a, b in zip(g1, g0):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_under_autocast_both_heads_run_in_its_dtype():
    """torch.autocast (TRL's bf16=True): both heads' tensors in bf16, as autocast runs a
    matmul; the fp32 leaves get fp32 gradients; against float64 on the bf16-rounded inputs."""
    hs, ws, bs, ht, wt, bt, y = inputs(seed=4)
    leaves = [t.float().requires_grad_() for t in (hs, ws, bs)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l1, _ = alignkit.distill_loss(leaves[0], leaves[1], ht.float(), wt.float(), y,
                                      student_bias=leaves[2], teacher_bias=bt.float(), beta=0.5)
    g1 = torch.autograd.grad(l1, leaves)
    r = [t.to(torch.bfloat16).double() for t in (hs, ws, bs, ht, wt, bt)]
    l0, _, g0 = oracle(*r, y, beta=0.5)
    assert float(l1.detach()) == pytest.approx(float(l0.detach()), rel=2e-2)
    for a, b in zip(g1, g0):
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max() <= 2e-2 * b.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("beta", BETAS)
def test_cuda_matches_oracle(beta, plan, dtype):
    """On a card (one logits GEMM per head and tile, whole-vocabulary elementwise steps, bf16 G
    for bf16 heads): against float64 on the inputs as the card sees them."""
    x = inputs(seed=6, V=300)
    cast = [None if t is None else t.to(dtype) for t in x[:6]]
    leaves = [t.cuda().requires_grad_() for t in cast[:3]]
    l1, m1 = alignkit.distill_loss(leaves[0], leaves[1], cast[3].cuda(), cast[4].cuda(),
                                   x[6].cuda(), student_bias=leaves[2],
                                   teacher_bias=cast[5].cuda(), beta=beta, temperature=0.9,
                                   tiles=alignkit.TileOptions(plan=plan, gpu_chunk_bytes=4 * 5 *
                                                              300 * 4, tile_bytes=4 * 5 * 300 * 4))
    g1 = torch.autograd.grad(l1, leaves)
    l0, m0, g0 = oracle(*[t.double() for t in cast], x[6], beta=beta, temperature=0.9)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert float(l1.detach()) == pytest.approx(float(l0.detach()), rel=tol, abs=tol * 1e-2)
    for a, b in zip(g1, g0):
        assert (a.double().cpu() - b).abs().max() <= tol * b.abs().max()
