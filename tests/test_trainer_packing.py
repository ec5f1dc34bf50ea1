"""The guard against cross-sequence leakage: padded, padding_free and shared_prompt give each
sequence the log-prob the model's own logits give it alone, unpadded, and the same loss and
gradients. Llama, Qwen2 and Gemma; tied and untied embeddings; an LM head with a bias."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import alignkit  # noqa: E402
from alignkit.train.data import Example  # noqa: E402
from alignkit.train.model import SequenceLogprobs, forward_batch  # noqa: E402
from alignkit.train.objective import compute_loss  # noqa: E402
from alignkit.train.packing import collate  # noqa: E402

V = 97
MODES = ("padded", "padding_free", "shared_prompt")


def tiny_model(family, tied=False, bias=False, attn="sdpa", seed=0):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tied, attn_implementation=attn)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
           "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM)}[family]
    extra = {"head_dim": 8} if family.startswith("gemma") else {}
    if family == "gemma2":       # a cap small enough to matter at a random init's logit scale
        extra["final_logit_softcapping"] = 0.5
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common, **extra)).float()
    if bias:
        head = nn.Linear(32, V, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.get_output_embeddings().weight)
            head.bias.normal_(0, 0.5)
        model.set_output_embeddings(head)
    return model


def examples(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return tuple(torch.randint(4, V, (k,), generator=g).tolist())
    lens = [(5, 7, 3), (2, 4, 9), (8, 1, 6), (3, 6, 6)]
    return [Example(ids(p), (ids(c), ids(r))) for p, c, r in lens[:n]]


def oracle_logps(model, exs):
    """Each sequence alone, no padding, through the model's own logits (float64 log-softmax)."""
    out = []
    for k in (0, 1):
        for e in exs:
            ids = torch.tensor([e.prompt + e.responses[k]])
            logits = model(input_ids=ids).logits[0].double()
            lp = logits.log_softmax(-1)
            P, R = len(e.prompt), len(e.responses[k])
            tgt = ids[0, P:P + R]
            out.append(lp[P - 1:P + R - 1].gather(1, tgt[:, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("family,tied,bias,attn", [
    ("llama", False, False, "sdpa"), ("llama", True, False, "eager"),
    ("qwen2", False, True, "sdpa"), ("gemma", True, False, "sdpa"),
    ("gemma", False, False, "eager"), ("gemma2", True, False, "eager")])
def test_packing_modes_match_the_models_own_logits(family, tied, bias, attn):
    model = tiny_model(family, tied, bias, attn)
    exs = examples()
    with torch.no_grad():
        want = oracle_logps(model, exs)
    mod = SequenceLogprobs(model, backend="torch")
    grads = {}
    for mode in MODES:
        model.zero_grad()
        batch = collate(exs, list(range(len(exs))), mode, pad_id=0)
        sums, counts = forward_batch(mod, batch)
        assert counts.tolist() == [len(e.responses[k]) for k in (0, 1) for e in exs]
        torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=2e-4,
                                   msg=lambda m: f"{mode}: {m}")
        loss, _ = compute_loss("dpo", {"beta": 0.5}, sums, counts,
                               (want.float() - 1.0 * torch.arange(6), counts))
        loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert all(g.abs().sum() > 0 for g in grads[mode].values()), mode
    for mode in MODES[1:]:
        for n in grads["padded"]:
            torch.testing.assert_close(grads[mode][n], grads["padded"][n], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{mode} grad {n}: {m}")


def test_shared_prompt_computes_the_prompt_once():
    exs = examples(n=4)
    padded = collate(exs, [0, 1, 2, 3], "padded", pad_id=0)
    free = collate(exs, [0, 1, 2, 3], "padding_free", pad_id=0)
    shared = collate(exs, [0, 1, 2, 3], "shared_prompt", pad_id=0)
    prompts = sum(len(e.prompt) for e in exs)
    # tokens run through the body: pass 1 (prompt + chosen) and pass 2 (rejected only)
    real = int(shared.attention_mask.sum() + shared.attention_mask2[:, shared.prefix:].sum())
    assert free.input_ids.numel() - real == prompts
    assert padded.tokens == free.tokens == shared.tokens
    # every layout gathers the same labels for each sequence
    for b in (free, shared):
        for s in range(8):
            assert torch.equal(b.labels[b.segment_ids == s],
                               padded.labels[padded.segment_ids == s])


def test_kto_mismatched_partners_are_extra_sequences():
    exs = [Example((5, 6), ((7, 8, 9),), True), Example((10,), ((11, 12),), False),
           Example((13, 14, 15), ((16,),), True)]
    b = collate(exs, [0, 2], "padding_free", pad_id=0, kl_partner=lambda i: (i + 1) % 3)
    assert b.num_sequences == 4 and b.num_examples == 2
    assert b.labels.tolist() == [7, 8, 9, 16, 11, 12, 7, 8, 9]
    assert b.segment_ids.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("loss,options", [("dpo", {"beta": 0.5}),
                                          ("orpo", {"beta": 0.5}),
                                          ("simpo", {"beta": 2.0, "gamma": 0.3})])
@pytest.mark.parametrize("grad_mode", ["single_pass", "recompute", "auto"])
def test_the_trainers_module_runs_the_fused_engine(loss, options, grad_mode, monkeypatch,
                                                   kept_rows):
    """The trainer's paired losses run as preference_loss inside the model module; every packing
    gives the loss and every parameter's gradient of the sums path (compute_loss on the module's
    per-sequence sums), and the single pass is what ran where it is asked for or chosen."""
    import alignkit.ops.pair_pass as sp
    from alignkit.train.objective import Paired, ref_logprobs_of
    ran = []
    real = sp._grads
    monkeypatch.setattr(sp, "_grads", lambda *a: ran.append(1) or real(*a))
    model = tiny_model("qwen2", bias=True)
    # two pairs: auto takes the single pass, the second pair's (untied: every other
    # sequence's) G tiles kept within the default keep budget at this size
    exs = examples(n=2)
    S = 2 * len(exs)
    single = grad_mode != "recompute"
    mod = SequenceLogprobs(model, backend="cpp" if alignkit.cpp_available() else "torch")
    for mode in MODES:
        batch = collate(exs, list(range(len(exs))), mode, pad_id=0)
        model.zero_grad()
        sums, counts = forward_batch(mod, batch)
        ref = (sums.detach() - 0.5 * torch.arange(float(S)), counts) if loss == "dpo" else None
        want, want_m = compute_loss(loss, options, sums, counts, ref)
        want.backward()
        want_g = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        before, kept_before = len(ran), len(kept_rows)
        got, got_m = forward_batch(mod, batch, Paired(loss, dict(options, grad_mode=grad_mode)),
                                   ref_logprobs_of(loss, options, ref, sums))
        got.backward()
        assert (len(ran) > before) == single, (mode, grad_mode)
        # the other pair's (untied: the other sequences') G kept, not formed again
        assert (len(kept_rows) > kept_before) == single, (mode, grad_mode)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for k in want_m:
            torch.testing.assert_close(got_m[k], want_m[k], rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want_g[n], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{mode} {n}: {m}")
