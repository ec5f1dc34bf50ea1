"""The single pass's budgets: the tile's default and knobs, the keep budget (deferred tokens' G
kept until their scalars are known, against float64 and the recompute, with a count of the kept
rows), and the peak within 1.3 x (grad_W + grad_h) + the tile budget."""
import pytest
import torch

import alignkit

from test_single_pass import check_single_pass, pair_inputs


def test_single_pass_tile_default_scales_with_a_big_vocabulary(monkeypatch):
    """single_pass_bytes' default: 64 MiB, or 512 fp32 rows where that is larger and within half
    of grad_W. At the RL bench's R1 head (V=151936, H=1024) 64 MiB held 110 rows, below the 256
    where auto takes the token pass, which then ran 1.28x the GEMM floor when forced; 512 rows
    let auto take it (441 rows measured 0.97x, bench/RESULTS.md)."""
    from alignkit.ops.options import TileOptions
    from alignkit.ops.pass_budget import long_tiles, tile_rows
    monkeypatch.delenv("ALIGNKIT_SINGLE_PASS_BYTES", raising=False)
    assert tile_rows(151936, H=1024) == 512
    assert tile_rows(151936, H=384) == 192                  # half of grad_W caps it
    assert tile_rows(32000, H=1024) == (64 << 20) // (4 * 32000)   # 64 MiB already holds more
    assert tile_rows(151936) == 110                         # no head given: the fixed default
    assert tile_rows(151936, H=1024, tiles=TileOptions(single_pass_bytes=4 * 151936 * 9)) == 9
    monkeypatch.setenv("ALIGNKIT_SINGLE_PASS_BYTES", str(4 * 151936 * 7))
    assert tile_rows(151936, H=1024) == 7                   # the variable wins over the default
    monkeypatch.delenv("ALIGNKIT_SINGLE_PASS_BYTES")
    W = torch.empty(151936, 1024, device="meta", requires_grad=True)
    assert long_tiles(W)


def test_tile_knobs_have_one_meaning_each(monkeypatch):
    """ALIGNKIT_TILE_BYTES is the recompute's tile budget only; the single pass has its own
    (ALIGNKIT_SINGLE_PASS_BYTES); a TileOptions field given in the call wins over both."""
    from alignkit.ops.options import TileOptions
    from alignkit.ops.pass_budget import tile_rows
    monkeypatch.setenv("ALIGNKIT_TILE_BYTES", str(4000 * 10))
    assert tile_rows(1000) == (64 << 20) // 4000                  # untouched by it
    monkeypatch.setenv("ALIGNKIT_SINGLE_PASS_BYTES", str(4000 * 7))
    assert tile_rows(1000) == 7
    assert tile_rows(1000, tiles=TileOptions(single_pass_bytes=4000 * 3)) == 3
    t = TileOptions(vocab_block=512).resolved()
    assert (t.tile_bytes, t.vocab_block, t.single_pass_bytes) == (40000, 512, 28000)
    with pytest.raises(ValueError, match="tile_bytes must be None or an int > 0"):
        TileOptions(tile_bytes=0)
    with pytest.raises(ValueError, match="triton_bwd must be None or one of"):
        TileOptions(triton_bwd="fast")
    monkeypatch.setenv("ALIGNKIT_VOCAB_BLOCK", "lots")
    with pytest.raises(ValueError, match="ALIGNKIT_VOCAB_BLOCK must be an integer"):
        TileOptions().resolved()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", ["all", "part"])
@pytest.mark.parametrize("loss,opts,shape", [
    ("dpo", dict(beta=0.2), dict(pairs=3)),                                   # tied
    ("simpo", dict(beta=2.0, gamma=0.5), dict(pairs=2, packed=True, bias=True)),
    ("dpo", dict(beta=0.5, loss_type="ipo"), dict(pairs=2, packed=True)),     # count-tied
    ("orpo", dict(beta=0.5), dict(bias=True, packed=True)),                   # untied, 1 pair
    ("cpo", dict(beta=0.5, cpo_alpha=0.7), dict(pairs=2, bias=True)),             # untied
])
def test_kept_deferred_tokens(loss, opts, shape, budget, dtype, backend, kept_rows):
    """The keep budget: the deferred sequences' G formed once and kept until their scalars are
    known. "all": every deferred token kept (the default budget holds these shapes); "part":
    8-row tiles and no budget beyond them, so 8 tokens are kept and the rest formed again. Both
    against float64 and the recompute; a counter proves how many rows were kept."""
    from alignkit.ops.backends import gemm_dtype
    per = 2 if gemm_dtype(dtype, torch.device("cpu")) == torch.bfloat16 else 4
    tiles = alignkit.TileOptions(single_pass_bytes=8 * per * 1000, keep_bytes=0) \
        if budget == "part" else None
    check_single_pass(loss, opts, shape, backend, dtype=dtype, tiles=tiles)
    _, _, _, y, seg = pair_inputs(**shape)
    S = 2 * shape.get("pairs", 1)
    sid = seg if seg is not None else torch.arange(S)[:, None].expand(y.shape)
    counts = torch.bincount(sid[y != -100], minlength=S)
    B = S // 2
    tied = loss in ("dpo", "simpo")
    deferred = int(counts.sum() - ((counts[:B] + counts[B:]).max() if tied else counts.max()))
    assert kept_rows == [deferred if budget == "all" else 8]


def test_keep_budget_knob(monkeypatch):
    """keep_bytes: default 3/10 of grad_W; ALIGNKIT_KEEP_BYTES; the call's TileOptions wins;
    the kept rows share the tile's budget (fp32: 4 bytes an element)."""
    from alignkit.ops.options import TileOptions
    from alignkit.ops.pass_budget import keep_rows, tile_rows
    monkeypatch.delenv("ALIGNKIT_KEEP_BYTES", raising=False)
    monkeypatch.delenv("ALIGNKIT_SINGLE_PASS_BYTES", raising=False)
    # the default: 3/10 of grad_W less the tile's two [rows, H] fp32 temporaries
    rows = (64 << 20) // (4 * 32000)
    assert TileOptions().resolved(head=(32000, 1024)).keep_bytes == \
        32000 * 1024 * 4 * 3 // 10 - 2 * rows * 1024 * 4
    assert TileOptions().resolved(head=(1000, 64)).keep_bytes == 0    # the tile holds them all
    assert TileOptions().resolved().keep_bytes == 0
    assert keep_rows(1000, 64) == (64 << 20) // 4000
    t = TileOptions(single_pass_bytes=4000 * 5, keep_bytes=4000 * 2)
    assert keep_rows(1000, 64, tiles=t) == 7
    monkeypatch.setenv("TRITON_INTERPRET", "1")          # backend="triton" on CPU tensors
    # triton: a bf16 tile row costs 6 bytes an element (the fp32 tile and G's bf16 row), fp16 4
    # (G formed over the tile); bf16 keeps G in G's buffer, its tile rows and keep_bytes / 2V
    assert tile_rows(1000, dtype=torch.bfloat16, tiles=t, backend="triton") == 3
    assert tile_rows(1000, dtype=torch.float16, tiles=t, backend="triton") == 5
    assert keep_rows(1000, 64, dtype=torch.bfloat16, tiles=t, backend="triton") == 3 + 4
    monkeypatch.setenv("ALIGNKIT_KEEP_BYTES", str(4000 * 3))
    assert keep_rows(1000, 64, tiles=TileOptions(single_pass_bytes=4000)) == 4
    assert keep_rows(1000, 64, tiles=TileOptions(single_pass_bytes=4000, keep_bytes=0)) == 1
    with pytest.raises(ValueError, match="keep_bytes must be None or an int >= 0"):
        TileOptions(keep_bytes=-1)
    monkeypatch.setenv("ALIGNKIT_KEEP_BYTES", "much")
    with pytest.raises(ValueError, match="ALIGNKIT_KEEP_BYTES must be an integer"):
        TileOptions().resolved()


@pytest.mark.parametrize("loss,pairs", [("orpo", 1), ("simpo", 2)])
def test_peak_within_the_bound_with_few_tokens_for_the_vocabulary(loss, pairs):
    """With the default keep budget the pass peaks within 1.3 x (grad_W + grad_h) + the tile
    budget even where the batch's grad_h is small beside the tile's two [rows, H] temporaries
    (B2's case: 1024 tokens, V=151936, 0.08 MiB over before the keep default made room for
    them). Here: 64-row tiles, and more deferred tokens than the keep budget holds."""
    from alignkit.bench.profiling import peak_memory_bytes
    from alignkit.ops.options import TileOptions
    g = torch.Generator().manual_seed(31)
    S, T, H, V = 2 * pairs, 160, 256, 8000
    h = torch.randn(S, T, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    y = torch.randint(0, V, (S, T), generator=g)
    y[:, :10] = -100
    tiles = TileOptions(single_pass_bytes=64 * V * 4)

    def step():
        h.grad = W.grad = None
        alignkit.preference_loss(h, W, y, loss=loss, grad_mode="single_pass",
                                 tiles=tiles)[0].backward()
    step()
    peak = peak_memory_bytes(step)
    bound = 1.3 * (V * H * 4 + S * T * H * 4) + 64 * V * 4
    assert peak <= bound, (peak, bound)
