"""Packed against unpacked, always (issue #16): every packing x attention implementation x
gradient checkpointing x tiled MLP gives each sequence the log-prob, and the model the gradients,
that the sequences run one at a time give (fp32 round-off). Plus what proves each path ran (call
counters), the flash-attn varlen call up to the kernel (a stand-in module records cu_seqlens),
the refusals, and the absent [N, N] mask."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from alignkit.bench.profiling import MemoryWindow  # noqa: E402
import alignkit.model.attention as attention  # noqa: E402
from alignkit.model.attention import FLASH_VARLEN, VARLEN, VarlenLayout, register  # noqa: E402
from alignkit.model.body import body_hidden  # noqa: E402
from alignkit.model.tiled_mlp import TiledMLP, chunk_tokens_for, tile_mlp, untile_mlp  # noqa: E402
from alignkit.train.config import ConfigError, TrainConfig  # noqa: E402
from alignkit.train.data import Example  # noqa: E402
from alignkit.train.model import SequenceLogprobs, forward_batch  # noqa: E402
from alignkit.train.packing import collate  # noqa: E402

from test_trainer_packing import V, examples, tiny_model  # noqa: E402

register()
MODES = ("padded", "padding_free", "shared_prompt")


def weights(S):
    return torch.linspace(0.5, 1.5, S, dtype=torch.float64)


def alone(model, exs):
    """Each sequence alone, unpadded, through the model's own sdpa forward: float64 log-probs
    [S] (chosen..., rejected...) and the gradients of sum_s w_s logp_s."""
    model.zero_grad(set_to_none=True)
    seqs = [(e.prompt, e.responses[k]) for k in (0, 1) for e in exs]
    w = weights(len(seqs))
    out = []
    for s, (p, r) in enumerate(seqs):
        ids = torch.tensor([p + r])
        lp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        tgt = ids[0, len(p):]
        val = lp[len(p) - 1:len(p) + len(r) - 1].gather(1, tgt[:, None]).sum()
        (w[s] * val).backward()
        out.append(val.detach())
    return torch.stack(out), {n: p.grad.clone() for n, p in model.named_parameters()}


def packed(model, exs, mode, attention_kind):
    model.zero_grad(set_to_none=True)
    batch = collate(exs, list(range(len(exs))), mode, pad_id=0, attention=attention_kind)
    sums, counts = forward_batch(SequenceLogprobs(model, backend="torch"), batch)
    (weights(len(sums)) * sums.double()).sum().backward()
    return sums.detach().double(), {n: p.grad.clone() for n, p in model.named_parameters()}


def close(got, want, rel=2e-5):
    scale = max(g.abs().max() for g in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=rel * scale, msg=n)


@pytest.fixture
def causal_calls(monkeypatch):
    """Counts the per-sequence attention calls of the varlen path (alignkit.model.attention._causal,
    and shared_prompt's rejected responses merged over their prompt on CPU,
    alignkit.model.prefix_attention.prefix_causal, recorded as ("prefix", queries))."""
    calls = []
    real, real_merge = attention._causal, attention.prefix_attention.prefix_causal

    def spy(q, *a):
        calls.append(q.shape[2])
        return real(q, *a)

    def merge_spy(q, *a):
        calls.append(("prefix", q.shape[2]))
        return real_merge(q, *a)
    monkeypatch.setattr(attention, "_causal", spy)
    monkeypatch.setattr(attention.prefix_attention, "prefix_causal", merge_spy)
    return calls


@pytest.fixture
def fake_flash(monkeypatch):
    """A stand-in ``flash_attn`` (the kernel cannot build without CUDA): the same contract as
    flash_attn_varlen_func / flash_attn_func ([tokens, heads, D] with int32 cu_seqlens, separate
    for queries and keys, causal aligned at the bottom right where a sequence has fewer queries
    than keys, as flash-attn >= 2.1 does; [B, L, heads, D]), computed with SDPA per sequence,
    and every call's arguments recorded."""
    calls = []
    mod = types.ModuleType("flash_attn")

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
               causal=False, window_size=(-1, -1), softcap=0.0):
        calls.append(dict(cu=cu_q.tolist(), cu_k=cu_k.tolist(), dtype=cu_q.dtype, max=max_q,
                          max_k=max_k, causal=causal, window=window_size, tokens=q.shape[0],
                          keys=k.shape[0]))
        bq, bk = cu_q.tolist(), cu_k.tolist()
        assert (q.shape[0], k.shape[0]) == (bq[-1], bk[-1]), "cu_seqlens do not cover q / k"
        outs = []
        for sq, eq, sk, ek in zip(bq, bq[1:], bk, bk[1:]):
            lq, lk = eq - sq, ek - sk
            mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if causal else None
            outs.append(F.scaled_dot_product_attention(
                *(t[a:z].transpose(0, 1)[None] for t, a, z in ((q, sq, eq), (k, sk, ek),
                                                              (v, sk, ek))),
                attn_mask=mask, scale=softmax_scale, enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outs)

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
              softcap=0.0):
        calls.append(dict(rows=q.shape[0], causal=causal))
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                              is_causal=causal, scale=softmax_scale,
                                              enable_gqa=True).transpose(1, 2)
    mod.flash_attn_varlen_func, mod.flash_attn_func = varlen, dense
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    return calls


# attention, checkpointing, tiled MLP: the dense attentions cannot checkpoint shared_prompt's
# KV-cache pass (refused by the config; tested below)
GRID = [(a, c, t) for a in ("sdpa", "eager", VARLEN, FLASH_VARLEN) for c in (False, True)
        for t in (False, True)]


def oracle_and_model(attn, n):
    """n examples, their unpacked oracle (alone's log-probs and gradients), and a fresh Llama of
    the same init on attention attn, in training mode."""
    exs = examples(n=n)
    want_lp, want_g = alone(tiny_model("llama"), exs)
    model = tiny_model("llama", attn="sdpa")
    model.set_attn_implementation(attn)
    model.train()
    return exs, want_lp, want_g, model


@pytest.mark.parametrize("attn,ckpt,tiled", GRID)
def test_packed_matches_alone_llama(attn, ckpt, tiled, causal_calls, fake_flash):
    exs, want_lp, want_g, model = oracle_and_model(attn, 4)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunks = []
    if tiled:
        tile_mlp(model, chunk_tokens=5)
        for layer in model.model.layers:
            layer.mlp.inner.register_forward_hook(lambda m, i, o: chunks.append(i[0].shape[0]))
    kind = "varlen" if attn in (VARLEN, FLASH_VARLEN) else "dense"
    for mode in MODES:
        if mode == "shared_prompt" and ckpt and kind == "dense":
            continue
        causal_calls.clear(), fake_flash.clear(), chunks.clear()
        lp, g = packed(model, exs, mode, kind)
        torch.testing.assert_close(lp, want_lp, rtol=0, atol=2e-5)
        close(g, want_g)
        S, layers = 2 * len(exs), len(model.model.layers)
        # what ran: one attention call per layer and sequence (padded: per batch of rows), more
        # with checkpointing's recompute
        per_fwd = {"padded": 1, "padding_free": S, "shared_prompt": S}[mode]
        runs = 2 if ckpt else 1
        if attn == VARLEN:
            assert len(causal_calls) == runs * layers * per_fwd, mode
            # shared_prompt: the rejected responses (half the sequences) merged over the prompt
            prefix = [c for c in causal_calls if isinstance(c, tuple)]
            assert len(prefix) == (runs * layers * S // 2 if mode == "shared_prompt" else 0)
            assert not fake_flash
        elif attn == FLASH_VARLEN:
            assert len(fake_flash) == runs * layers and not causal_calls, mode
            if mode != "padded":
                assert fake_flash[0]["dtype"] == torch.int32 and fake_flash[0]["causal"]
                # shared_prompt: the queries are the row, the keys hold each prompt twice
                same = fake_flash[0]["cu"] == fake_flash[0]["cu_k"]
                assert same == (mode == "padding_free"), mode
        else:
            assert not causal_calls and not fake_flash
        if tiled:                       # chunks of at most 5 tokens, in forward and backward
            assert chunks and max(chunks) <= 5 and len(chunks) > 2 * runs * layers


@pytest.mark.parametrize("path", ["merge", "mask", "prompt again"])
def test_shared_prompt_runs_the_prompt_queries_once(monkeypatch, path):
    """varlen shared_prompt's rejected response. On CPU (merge): its queries alone, as two flash
    calls (the prompt block, then its own causal block) merged by log-sum-exp, with no mask and no
    prompt query run twice. Where that does not apply (dropout, softcap, a short window, not a
    CPU tensor; forced off here): within the mask budget its queries alone over [prompt, rejected]
    with a bottom-right causal mask; past it (a budget of 1 byte) the prompt's queries run again
    with no mask. Every way, the log-probs and gradients are the unpacked ones."""
    if path != "merge":
        monkeypatch.setattr(attention.prefix_attention, "applies", lambda *a: False)
    if path == "prompt again":
        monkeypatch.setattr(attention, "MASK_BYTES", 1)
    calls, merged = [], []
    real, real_merge = F.scaled_dot_product_attention, attention.prefix_attention.prefix_causal

    def sdpa(q, k, v, *a, **kw):
        calls.append((q.shape[2], k.shape[2], kw.get("attn_mask") is not None))
        return real(q, k, v, *a, **kw)

    def merge(q, kp, vp, k, v, scale):
        merged.append((q.shape[2], kp.shape[2], k.shape[2]))
        return real_merge(q, kp, vp, k, v, scale)
    exs, want_lp, want_g, model = oracle_and_model(VARLEN, 3)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(attention.prefix_attention, "prefix_causal", merge)
    lp, g = packed(model, exs, "shared_prompt", "varlen")
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=2e-5)
    close(g, want_g)
    layers = len(model.model.layers)
    P = [len(e.prompt) for e in exs]
    R = [len(e.responses[1]) for e in exs]
    C = [len(e.responses[0]) for e in exs]
    chosen = [(p + c, p + c, False) for p, c in zip(P, C)]
    rejected = {"merge": [], "mask": [(r, p + r, True) for p, r in zip(P, R)],
                "prompt again": [(p + r, p + r, False) for p, r in zip(P, R)]}[path]
    assert sorted(calls) == sorted((rejected + chosen) * layers)
    want_merged = [(r, p, r) for p, r in zip(P, R)] * layers if path == "merge" else []
    assert sorted(merged) == sorted(want_merged)


def test_flash_gets_the_sequences_cu_seqlens(fake_flash):
    """padding_free: one flash call per layer over the whole row, cu_seqlens = the sequences'
    cumulative lengths, max_seqlen the longest; shared_prompt: the row's own queries (each
    prompt's once) over keys [prompt, chosen] and [prompt, rejected] per pair (the numerics:
    test_packed_matches_alone_llama, through the stand-in's bottom-right causal)."""
    exs = examples(n=3)
    model = tiny_model("llama", attn=FLASH_VARLEN)
    lens = [len(e.prompt) + len(e.responses[k]) for k in (0, 1) for e in exs]
    b = collate(exs, [0, 1, 2], "padding_free", 0, attention="varlen")
    assert b.position_ids[0].tolist() == [t for n in lens for t in range(n)]
    assert b.attention_mask.shape == (1, sum(lens))              # no [N, N] mask
    with torch.no_grad():
        forward_batch(SequenceLogprobs(model), b)
    want = [0] + torch.tensor(lens).cumsum(0).tolist()
    assert [c["cu"] for c in fake_flash] == [want] * 2 and fake_flash[0]["max"] == max(lens)
    fake_flash.clear()
    b = collate(exs, [0, 1, 2], "shared_prompt", 0, attention="varlen")
    with torch.no_grad():
        forward_batch(SequenceLogprobs(model), b)
    keys = [n for e in exs for n in (len(e.prompt) + len(e.responses[0]),
                                     len(e.prompt) + len(e.responses[1]))]
    queries = [n for e in exs for n in (len(e.prompt) + len(e.responses[0]),
                                        len(e.responses[1]))]
    row = sum(len(e.prompt) + len(e.responses[0]) + len(e.responses[1]) for e in exs)
    assert len(fake_flash) == 2                                 # one call a layer
    for c in fake_flash:
        assert c["cu_k"] == [0] + torch.tensor(keys).cumsum(0).tolist()
        assert c["cu"] == [0] + torch.tensor(queries).cumsum(0).tolist()
        assert (c["max_k"], c["max"]) == (max(keys), max(queries)) and c["causal"]
        assert c["tokens"] == row == b.input_ids.shape[1]       # the prompts' queries once
        assert c["keys"] == sum(keys)                           # their keys for both responses


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gemma2"])
def test_packed_matches_alone_families(family, causal_calls):
    """Qwen2 (biased projections), Gemma (scaled embeddings), Gemma 2 (attention softcap: the
    exact per-sequence math path) under varlen, with checkpointing and the tiled MLP."""
    ref = tiny_model(family, attn="eager")
    exs = examples(n=3)
    want_lp, want_g = alone(ref, exs)
    model = tile_mlp(tiny_model(family, attn=VARLEN), chunk_tokens=6)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for mode in MODES:
        causal_calls.clear()
        lp, g = packed(model, exs, mode, "varlen")
        torch.testing.assert_close(lp, want_lp, rtol=0, atol=3e-5)
        close(g, want_g)
        assert causal_calls


def test_the_models_own_calls_keep_sdpa_semantics():
    """Without a layout (generate, the model's own forward, left padding) the varlen names are
    sdpa: the same logits as sdpa on a left-padded batch."""
    a, b = tiny_model("llama"), tiny_model("llama", attn=VARLEN)
    ids = torch.randint(4, V, (2, 9))
    am = torch.ones(2, 9, dtype=torch.long)
    am[0, :3] = 0
    with torch.no_grad():
        want = a(input_ids=ids, attention_mask=am).logits
        got = b(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(got[am.bool()], want[am.bool()])
    g = tiny_model("gemma2", attn=VARLEN)                     # softcap: the math path, masked
    e = tiny_model("gemma2", attn="eager")
    with torch.no_grad():
        torch.testing.assert_close(g(input_ids=ids, attention_mask=am).logits[am.bool()],
                                   e(input_ids=ids, attention_mask=am).logits[am.bool()])


def test_a_layout_never_reaches_an_attention_that_would_ignore_it():
    model = tiny_model("llama", attn="sdpa")
    b = collate(examples(n=2), [0, 1], "padding_free", 0, attention="varlen")
    with pytest.raises(ValueError, match=r"varlen layout \(alignkit_layout\) needs the model's "
                       "attn_implementation to be alignkit_varlen or alignkit_fa_varlen"):
        body_hidden(model.get_decoder(), b.input_ids, b.position_ids, b.attention_mask,
                    layout=b.layout)


def test_varlen_padding_free_builds_no_square_mask():
    """N=4096 tokens in one row: the dense path's float mask alone is 4·N² = 64 MiB; the varlen
    path's micro-batch, forward and backward stay a fraction of that (tiny model)."""
    g = torch.Generator().manual_seed(0)

    def ids(k):
        return tuple(torch.randint(4, V, (k,), generator=g).tolist())
    exs = [Example(ids(500), (ids(524), ids(524))) for _ in range(2)]
    peaks = {}
    for kind, attn in (("dense", "sdpa"), ("varlen", VARLEN)):
        model = tiny_model("llama", attn=attn)
        w = MemoryWindow()
        w.start()
        b = collate(exs, [0, 1], "padding_free", 0, attention=kind)
        assert b.input_ids.shape[1] == 4096
        sums, _ = forward_batch(SequenceLogprobs(model), b)
        sums.sum().backward()
        peaks[kind] = w.stop()
    assert peaks["dense"] > 64 * 2**20 > 2 * peaks["varlen"], peaks


def test_tiled_mlp_keeps_names_and_bf16_error():
    model = tiny_model("llama", attn=VARLEN)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    tile_mlp(model, chunk_tokens=3)
    tile_mlp(model)                                       # idempotent
    assert all(isinstance(layer.mlp, TiledMLP) and layer.mlp.chunk_tokens == 3
               for layer in model.model.layers)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    exs = examples(n=3)
    grads = {}
    for tiled in (True, False):
        if not tiled:
            untile_mlp(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads[tiled] = packed(model, exs, "padding_free", "varlen")[1]
    _, g64 = packed(model.double(), exs, "padding_free", "varlen")
    for n in g64:   # tiling's bf16 rounding is within the untiled bf16 run's own error
        err_t = (grads[True][n].double() - g64[n]).abs().max()
        err_u = (grads[False][n].double() - g64[n]).abs().max()
        assert err_t <= 2 * err_u + 1e-3 * g64[n].abs().max(), n
    assert chunk_tokens_for(256) == 1024 and chunk_tokens_for(4096) == 4096
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        TiledMLP(torch.nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match="tiled_mlp needs decoder layers"):
        tile_mlp(torch.nn.Linear(2, 2))


def test_config_attention_choices_and_refusals(monkeypatch):
    assert TrainConfig().attention() == VARLEN                 # no CUDA here
    assert TrainConfig(attn_implementation="sdpa").attention() == "sdpa"
    with pytest.raises(ConfigError, match="flash-attn runs on CUDA only"):
        TrainConfig(attn_implementation="flash_attention_2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import importlib.util
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find(name, *a))
    with pytest.raises(ConfigError, match=r"flash-attn is not installed \(pip install"):
        TrainConfig(attn_implementation="flash_attention_2")
    assert TrainConfig().attention() == VARLEN                 # auto without flash-attn
    monkeypatch.setattr(attention, "flash_attn_missing", lambda: None)
    assert TrainConfig().attention() == FLASH_VARLEN
    assert TrainConfig(precision="fp32").attention() == VARLEN
    assert TrainConfig(attn_implementation="flash_attention_2").attention() == FLASH_VARLEN
    with pytest.raises(ConfigError, match="flash_attention_2 runs in bf16/fp16 only"):
        TrainConfig(attn_implementation="flash_attention_2", precision="fp32")
    with pytest.raises(ConfigError, match="KV cache"):
        TrainConfig(packing="shared_prompt", gradient_checkpointing=True,
                    attn_implementation="eager")
    TrainConfig(packing="shared_prompt", gradient_checkpointing=True)       # varlen: one row
    with pytest.raises(ConfigError, match="tiled_mlp must be true or false"):
        TrainConfig(tiled_mlp="yes")


def test_trainer_runs_every_packing_long_path_and_saves_plain_weights(tmp_path, causal_calls):
    """The front door: padding_free / shared_prompt with checkpointing and the tiled MLP under the
    default attention reach the varlen path and the tiled MLP; the saved model loads as a plain
    CausalLM with the trained weights."""
    from alignkit.train import PreferenceTrainer
    from alignkit.train.tokenizer import from_vocabulary
    tok = from_vocabulary([f"w{i}" for i in range(60)], "{% for m in messages %}{{ m['content'] }}"
                          " {% endfor %}", str(tmp_path / "tok"))
    rows = [{"prompt": " ".join(f"w{(i * 7 + j) % 60}" for j in range(3 + i % 4)),
             "chosen": " w1 w2" + " w3" * (i % 3), "rejected": " w4" * (1 + i % 2)}
            for i in range(6)]
    mc = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    for packing in ("padding_free", "shared_prompt"):
        causal_calls.clear()
        out = tmp_path / packing
        tr = PreferenceTrainer(dict(model_config=mc, tokenizer=str(tmp_path / "tok"),
                                    packing=packing, gradient_checkpointing=True, tiled_mlp=True,
                                    max_steps=2, batch_size=2, lr=1e-3, output_dir=str(out),
                                    reference="none", loss="simpo", progress=False,
                                    tensorboard=False), train_data=rows, log=lambda *a: None)
        assert tr.attention == "varlen"
        assert all(isinstance(layer.mlp, TiledMLP) for layer in tr.model.model.layers)
        tr.train()
        assert len(causal_calls) >= 2 * 2 * 2 * 4      # steps x layers x (fwd + recompute) x S
        # shared_prompt: the rejected responses through the CPU prefix merge, in forward and in
        # checkpointing's recompute (steps x layers x 2 x pairs)
        merged = [c for c in causal_calls if isinstance(c, tuple)]
        assert len(merged) == (2 * 2 * 2 * 2 if packing == "shared_prompt" else 0), packing
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out / "final"))
        state = tr.model.state_dict()
        for k, v in loaded.state_dict().items():
            torch.testing.assert_close(v, state[k], msg=k)


def test_a_layout_whose_pieces_do_not_tile_the_row_is_refused():
    """The varlen attention splits the row at the pieces' bounds: a gap, an overlap or a prompt
    after its response is named at construction, not attended wrongly."""
    VarlenLayout.of([(0, 0, 0, 3), (0, 2, 3, 5)])                       # a valid shared prompt
    for bad in ([(0, 0, 1, 3)], [(0, 0, 0, 3), (0, 0, 4, 6)], [(0, 0, 0, 3), (4, 5, 3, 6)]):
        with pytest.raises(ValueError, match="VarlenLayout pieces must tile the row"):
            VarlenLayout.of(bad)
