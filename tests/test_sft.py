"""alignkit.sft_loss against the float64 oracle from full logits (loss, metrics and every
gradient), on every CPU backend and both plans (the fused token pass and the torch chunks), over
the options that change the math (smoothing, z-loss, DFT, token weights, num_items, soft cap,
temperature, bias), on odd shapes with ignored labels and large logits; the oracle's smoothing
against torch's F.cross_entropy, and its DFT against TRL's formula."""
import pytest
import torch
import torch.nn.functional as F

import alignkit
from alignkit.ops import plan
from alignkit.testing.oracle import oracle_sft_loss
from conftest import make_inputs

V, H = 301, 24
# tiles of 40 rows: several tiles, the last one short
TILES = alignkit.TileOptions(single_pass_bytes=40 * V * 4, tile_bytes=6 * 4 * V * 16)

CASES = [
    dict(),
    dict(label_smoothing=0.1, bias=True),
    dict(z_loss=1e-3),
    dict(label_smoothing=0.2, z_loss=1e-2, loss_type="dft", bias=True),
    dict(loss_type="dft", temperature=0.7),
    dict(label_smoothing=0.15, softcap=5.0, temperature=1.3, bias=True),
    dict(label_smoothing=0.3, z_loss=1e-3, softcap=4.0, loss_type="dft"),
    dict(label_smoothing=0.1, token_weights=True, num_items=57),
    dict(label_smoothing=0.05, z_loss=1e-4, scale=60.0, bias=True),       # logits of ~1e2-1e3
]


def _run(case, seed, dtype=torch.float32, backend="cpp", plan_name="single_pass",
         shape=(3, 29)):
    c = dict(case)
    bias, scale, tw = c.pop("bias", False), c.pop("scale", 1.0), c.pop("token_weights", False)
    h, W, b, y = make_inputs(shape, H, V, dtype=dtype, bias=bias, scale=scale, seed=seed)
    if tw:
        c["token_weights"] = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    tiles = TILES if plan_name is None else \
        alignkit.TileOptions(**{**TILES.__dict__, "plan": plan_name})
    loss, m = alignkit.sft_loss(h, W, y, bias=b, backend=backend, tiles=tiles, **c)
    loss.backward()
    ins = [x for x in (h, W, b) if x is not None]
    ref = [x.detach().double().requires_grad_() for x in ins]
    c64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    rl, rm = oracle_sft_loss(ref[0], ref[1], y, bias=ref[2] if b is not None else None, **c64)
    rl.backward()
    return loss, m, [x.grad for x in ins], rl, rm, [x.grad for x in ref]


def _close(loss, m, grads, rl, rm, rgrads, rtol):
    scale = max(1.0, abs(rl.item()))
    assert abs(loss.item() - rl.item()) <= rtol * scale, (loss.item(), rl.item())
    assert abs(m["entropy"].item() - rm["entropy"].item()) <= rtol * max(1.0, rm["entropy"].item())
    assert m["mean_token_accuracy"].item() == pytest.approx(rm["mean_token_accuracy"].item(),
                                                            abs=1e-6)
    for g, r in zip(grads, rgrads):
        err = (g.double() - r).abs().max().item()
        assert err <= rtol * r.abs().max().item() + 1e-9, (err, r.abs().max().item())


@pytest.mark.parametrize("plan_name", ["single_pass", "recompute"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
                         or "plain")
def test_matches_oracle(case, plan_name, backend):
    out = _run(case, seed=len(str(case)), backend=backend, plan_name=plan_name)
    assert plan.LAST[0].plan == plan_name          # the plan under test is what ran
    _close(*out, rtol=1e-4)


def test_bf16_matches_oracle():
    case = dict(label_smoothing=0.1, z_loss=1e-3, bias=True)
    out = _run(case, seed=3, dtype=torch.bfloat16, plan_name="single_pass")
    _close(*out, rtol=3e-2)


def test_float64_and_no_grad():
    # float64 takes the torch chunks (exact to float64); no_grad the pass's forward
    out = _run(dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0), seed=5,
               dtype=torch.float64, plan_name=None)
    assert plan.LAST[0].plan == "recompute"
    _close(*out, rtol=1e-10)
    h, W, b, y = make_inputs((2, 17), H, V, bias=True, seed=6)
    with torch.no_grad():
        loss, _ = alignkit.sft_loss(h, W, y, bias=b, label_smoothing=0.1, tiles=TILES)
    assert plan.LAST[0].plan == "single_pass"
    rl, _ = oracle_sft_loss(h.double(), W.double(), y, bias=b.double(), label_smoothing=0.1)
    assert abs(loss.item() - rl.item()) < 1e-5


def test_oracle_smoothing_is_torch_cross_entropy():
    # the oracle's smoothing and dft against independent definitions: torch's own
    # F.cross_entropy(label_smoothing=...) and TRL 1.16's per-token dft loss −lp·sg(exp(lp))
    h, W, b, y = make_inputs((4, 11), H, V, bias=True, dtype=torch.float64, seed=7)
    logits = (h @ W.t() + b).reshape(-1, V)
    for eps in (0.0, 0.1, 0.4):
        ours, _ = oracle_sft_loss(h, W, y, bias=b, label_smoothing=eps)
        theirs = F.cross_entropy(logits, y.reshape(-1), label_smoothing=eps)
        torch.testing.assert_close(ours, theirs)
    lp = torch.log_softmax(logits, -1).gather(1, y.reshape(-1, 1).clamp(min=0)).squeeze(1)
    keep = y.reshape(-1) != -100
    dft = (-(lp * lp.exp().detach()) * keep).sum() / keep.sum()
    torch.testing.assert_close(oracle_sft_loss(h, W, y, bias=b, loss_type="dft")[0], dft)


def test_all_ignored():
    h, W, _, y = make_inputs((2, 5), H, V, seed=8)
    y[:] = -100
    loss, m = alignkit.sft_loss(h, W, y, label_smoothing=0.1, z_loss=1e-3, tiles=TILES)
    loss.backward()
    assert loss.item() == 0.0 and m["entropy"].item() == 0.0
    assert h.grad.abs().max().item() == 0.0 and W.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("kw, match", [
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(loss_type="kl"), "loss_type"),
    (dict(token_weights=torch.ones(3)), "token_weights"),
    (dict(tiles="fast"), "tiles"),
    (dict(num_items=torch.ones(2)), "num_items"),
])
def test_bad_input(kw, match):
    h, W, _, y = make_inputs((2, 5), H, V, seed=9)
    with pytest.raises((ValueError, TypeError), match=match):
        alignkit.sft_loss(h, W, y, **kw)


@pytest.mark.parametrize("case", [dict(label_smoothing=0.1, z_loss=1e-3, bias=True),
                                  dict(label_smoothing=0.2, softcap=5.0, loss_type="dft")],
                         ids=["smooth-zloss", "smooth-softcap-dft"])
def test_cpu_bf16_gemm_path(case, backend, monkeypatch):
    # the CPU bf16 path (bf16 logits kept in the tile, G a vocab block at a time, the sums'
    # fix-ups per block), forced where this CPU has no bf16 units
    import alignkit.ops.vocab_tiles as vt
    monkeypatch.setattr(vt, "gemm_dtype", lambda dt, dev: dt)
    lowp = []
    real = vt.VocabTiles._lowp_grads
    monkeypatch.setattr(vt.VocabTiles, "_lowp_grads",
                        lambda self, *a, **k: lowp.append(1) or real(self, *a, **k))
    out = _run(case, seed=11, dtype=torch.bfloat16, backend=backend, plan_name="single_pass")
    assert lowp
    _close(*out, rtol=3e-2)


@pytest.mark.parametrize("kw", [dict(label_smoothing=0.1, z_loss=1e-4),
                                dict(label_smoothing=0.1, softcap=30.0)],
                         ids=["smooth-zloss", "smooth-softcap"])
def test_peak_within_the_bound(kw):
    # smoothing and z-loss keep the pass's memory: no [N, V] tensor, the peak within
    # 1.3 x (grad_W + grad_h) + the tile budget (under a soft cap the tanh(x/c) buffer shares
    # the budget: a third of the rows)
    from alignkit.bench.profiling import peak_memory_bytes
    g = torch.Generator().manual_seed(31)
    N, Hs, Vs = 600, 128, 8000
    h = torch.randn(N, Hs, generator=g).requires_grad_()
    W = (torch.randn(Vs, Hs, generator=g) / Hs ** 0.5).requires_grad_()
    y = torch.randint(0, Vs, (N,), generator=g)
    tiles = alignkit.TileOptions(single_pass_bytes=64 * Vs * 4, plan="single_pass")

    def step():
        alignkit.sft_loss(h, W, y, tiles=tiles, **kw)[0].backward()
    step()
    h.grad = W.grad = None         # freed outside the window (a free of a block from before it
    peak = peak_memory_bytes(step)  # would count with an unknown size)
    bound = 1.3 * (Vs * Hs * 4 + N * Hs * 4) + 64 * Vs * 4
    assert peak <= bound and peak < N * Vs * 4, (peak, bound)
