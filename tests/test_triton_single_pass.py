"""The single pass's full-vocabulary tiles on the Triton kernels (the logits kernels, G written
beside the fp32 tile, the kept rows, the token pass), against the float64 oracle and the
recompute, where the tensors are: CPU tensors under the interpreter (TRITON_INTERPRET=1), CUDA
tensors on a card. Runs as test_triton_interpreter.py does (its docstring)."""
import pytest
import torch

import alignkit
from conftest import assert_oracle, on, triton_devices

pytestmark = triton_devices
triton = pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_pass_tile_kernel(dtype, device):
    # one [rows, V] tile, V=4099 (the 1024-column blocks do not divide it), softcap + temperature:
    # log-probs, then G = w·(onehot − p)·dz/dx written over the tile in place: the logits kernels
    # as the single pass runs them (alignkit/ops/vocab_tiles.py, VocabTiles._score)
    from alignkit.ops.triton_path import logits_backward, logits_forward

    def tile_logprob_grad(t, y, w, inv_temp, cap, ignore_index):
        lp, m, logs, _ = logits_forward(t, y, inv_temp, ignore_index, cap)
        if w is not None:
            logits_backward(t, t, y, m, logs, w, None, None, inv_temp, cap)
        return lp
    g = torch.Generator().manual_seed(46)
    x64 = torch.randn(7, 4099, generator=g, dtype=torch.float64) * 6
    y = torch.randint(0, 4099, (7,), generator=g)
    w = torch.randn(7, generator=g)
    x64, y, w = on(device, x64, y, w)
    cap, temp = 4.0, 0.8

    def torch_lp_grad(x):
        x = x.detach().clone().requires_grad_()
        z = cap * torch.tanh(x / cap) / temp
        lp = torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
        (lp * w.to(lp.dtype)).sum().backward()
        return lp.detach(), x.grad

    want_lp, want_g = torch_lp_grad(x64)
    naive_lp, naive_g = torch_lp_grad(x64.to(dtype).float() if dtype != torch.float32
                                      else x64.float())
    t = x64.to(dtype)
    lp = tile_logprob_grad(t, y, None, 1 / temp, cap, -100)          # forward only: tile untouched
    assert torch.equal(t, x64.to(dtype))
    assert_oracle("tile logprob", lp, want_lp, naive_lp)
    lp2 = tile_logprob_grad(t, y, w, 1 / temp, cap, -100)
    assert torch.equal(lp, lp2)
    assert t.dtype == dtype
    # G is stored in the tile's dtype: its error is that dtype's rounding of the exact G
    assert_oracle("tile G", t.float(), want_g, naive_g.to(dtype).float() if dtype != torch.float32
                  else naive_g)


@pytest.mark.parametrize("loss,opts,shape", [
    ("dpo", dict(beta=0.2), dict(pairs=2, bias=True)),                  # tied, two pairs
    ("simpo", dict(beta=2.0, gamma=0.5, softcap=5.0, temperature=0.7), dict(packed=True)),
    ("orpo", dict(beta=0.5), dict(bias=True, packed=True)),            # untied
])
def test_single_pass_losses_on_triton(loss, opts, shape, monkeypatch, device):
    from test_single_pass import check_single_pass
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    monkeypatch.setenv("ALIGNKIT_SINGLE_PASS_BYTES", str(16 * 1000 * 4))   # 16-row tiles
    monkeypatch.setenv("ALIGNKIT_TRITON_G_BYTES", str(16 * 1000 * 4))      # ... on CUDA too
    check_single_pass(loss, opts, shape, "triton", device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_single_pass_low_precision_on_triton(monkeypatch, dtype, device, kept_rows):
    from alignkit.ops.vocab_tiles import VocabTiles
    from test_single_pass import check_single_pass
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    check_single_pass("simpo", dict(beta=2.0, gamma=0.5), dict(T=19, H=16, V=300), "triton",
                      dtype=dtype, device=device)
    # two pairs: pair 1's 24 tokens are deferred. A 9000-byte tile budget: 5 rows in bf16 (6
    # bytes an element: the fp32 tile and G's bf16 rows), 7 in fp16 (4: G formed over the
    # tile), and 8 rows of keep_bytes. bf16: the kept rows share G's buffer beside the fp32
    # tile, 5 + 8 = 13 kept and 11 formed again; fp16: kept in place in the fp32 tile's buffer,
    # (9000 + 4800) // 1200 = 11 kept. The rows scored count the tokens formed twice.
    monkeypatch.setenv("ALIGNKIT_SINGLE_PASS_BYTES", str(5 * 6 * 300))
    monkeypatch.setenv("ALIGNKIT_TRITON_G_BYTES", str(5 * 6 * 300))
    shared, scored = [], []
    finish, score = VocabTiles.finish_kept, VocabTiles._score

    def finish_kept(self, sel, scale):
        buf = self.gbuf if self.gbuf is not None else self.tile
        shared.append(self.kept.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr())
        return finish(self, sel, scale)
    monkeypatch.setattr(VocabTiles, "finish_kept", finish_kept)
    monkeypatch.setattr(VocabTiles, "_score", lambda self, t, hc, *a, **k: scored.append(
        hc.shape[0]) or score(self, t, hc, *a, **k))
    check_single_pass("dpo", dict(beta=0.2), dict(T=19, H=16, V=300, pairs=2), "triton",
                      dtype=dtype, device=device,
                      tiles=alignkit.TileOptions(keep_bytes=8 * 2 * 300))
    kept, rows = (13, 5) if dtype == torch.bfloat16 else (11, 7)
    assert kept_rows == [kept] and shared == [True]
    assert sum(scored) == 24 + 24 + (24 - kept) and max(scored) == rows   # 24 tokens a pair


def test_single_pass_bf16_tile_is_fp32(monkeypatch, device):
    # The same bf16 inputs through both modes: the recompute forms fp32 logits, so must the single
    # pass. Both then differ by fp32 summation order only (~1e-6 relative); a tile that holds the
    # logits in bf16 rounds each by up to 2^-9 relative before the log-softmax (5e-3 on this loss).
    from test_single_pass import pair_inputs
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    h, W, _, y, _ = pair_inputs(T=19, H=16, V=300, seed=47, scale=4.0)
    h, W, y = h.to(device, torch.bfloat16), W.to(device, torch.bfloat16), y.to(device)
    L = {m: alignkit.preference_loss(h, W, y, loss="simpo", beta=2.0, gamma=0.5, grad_mode=m,
                                     backend="triton")[0].item()
         for m in ("recompute", "single_pass")}
    assert abs(L["single_pass"] - L["recompute"]) < 1e-5 * max(1.0, abs(L["recompute"])), L


def test_policy_token_pass_on_triton(monkeypatch, device):
    # the token pass on the triton tile kernels, entropy bonus included, against the recompute
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    monkeypatch.setenv("ALIGNKIT_SINGLE_PASS_BYTES", str(16 * 300 * 4))      # several tiles
    from test_policy import _inputs
    h64, W64, b64, y, g = _inputs(S=3, Tn=9, H=16, V=300, seed=48)
    adv, old = torch.randn(3, generator=g), torch.randn(3, 9, generator=g) * 0.1 - 4
    h64, W64, b64, y, adv, old = on(device, h64, W64, b64, y, adv, old)
    out = {}
    for mode in ("single_pass", "recompute"):
        h, W, b = (t.float().requires_grad_() for t in (h64, W64, b64))
        loss, m = alignkit.policy_loss(h, W, y, advantages=adv, old_logprobs=old, bias=b,
                                       loss_type="grpo", backend="triton", grad_mode=mode,
                                       entropy_coef=0.05)
        loss.backward()
        out[mode] = (loss.detach(), m["entropy"], h.grad, W.grad, b.grad)
    for a, r in zip(out["single_pass"], out["recompute"]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", [dict(label_smoothing=0.1, z_loss=1e-3, bias=True),
                                  dict(label_smoothing=0.2, softcap=4.0, loss_type="dft"),
                                  dict(loss_type="dft", temperature=0.7)],
                         ids=["smooth-zloss", "smooth-softcap-dft", "dft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sft_token_pass_on_triton(monkeypatch, device, case, dtype):
    # sft_loss's pass (lse and Σz with their coefficients) on the triton tile kernels, against
    # the float64 oracle
    monkeypatch.setenv("ALIGNKIT_TRITON_BLOCKS", "16,64,32")
    import conftest
    import test_sft
    from alignkit.ops import triton_path
    calls = []
    bwd = triton_path.logits_backward
    monkeypatch.setattr(triton_path, "logits_backward", lambda *a: calls.append(1) or bwd(*a))
    monkeypatch.setattr(test_sft, "make_inputs",
                        lambda *a, **k: on(device, *conftest.make_inputs(*a, **k)))
    out = test_sft._run(case, seed=49, backend="triton", plan_name="single_pass", shape=(2, 23),
                        dtype=dtype)
    assert calls                                      # the triton tile kernels formed G
    # bf16: G is written in bf16 beside the fp32 tile (the sums' fix-ups land on it there)
    test_sft._close(*out, rtol=1e-4 if dtype == torch.float32 else 2e-2)
