"""patch_model and the HF / plain-loop helper against the model's own logits (float64)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import alignkit  # noqa: E402
from alignkit.integrations.hf import (  # noqa: E402
    fused_preference_loss,
    pack_pairs,
    sequence_logprobs_from_model,
)
from alignkit.losses import dpo_loss  # noqa: E402
from alignkit.model.attention import VARLEN, register  # noqa: E402

V = 101


def tiny(seed=0, bias=False, **kw):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, **kw)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg)
    if bias:
        head = torch.nn.Linear(32, V, bias=True)
        with torch.no_grad():
            head.weight.copy_(m.lm_head.weight)
            head.bias.normal_(0, 0.5)
        m.lm_head = head
    return m


def oracle(model, ids, labels):
    with torch.no_grad():
        lp = model(input_ids=ids).logits.double().log_softmax(-1)[:, :-1]
    y = labels[:, 1:]
    tok = lp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    ent = -(lp.exp() * lp).sum(-1) * (y != -100)
    return tok, ent


@pytest.mark.parametrize("bias", [False, True])
def test_patch_model_returns_the_models_log_probs(bias):
    m = tiny(bias=bias)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (3, 37), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1, 20:] = -100
    want, want_ent = oracle(m, ids, labels)
    with alignkit.patch_model(m, entropy=True) as pm:
        assert pm is m
        out = m(input_ids=ids, labels=labels)
        assert out.log_probs.shape == (3, 36)
        torch.testing.assert_close(out.log_probs.double(), want, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(out.entropy.double(), want_ent, rtol=1e-5, atol=2e-5)
        n = (labels[:, 1:] != -100).sum()
        torch.testing.assert_close(out.loss.double(), -want.sum() / n, rtol=1e-5, atol=1e-6)
        out.loss.backward()
        assert m.lm_head.weight.grad is not None and m.model.embed_tokens.weight.grad.abs().sum() > 0
        assert m(input_ids=ids).logits.shape == (3, 37, V)       # no labels: the original path
    assert m(input_ids=ids, labels=ids).logits.shape == (3, 37, V)   # unpatched after the block


def test_helper_padded_and_packed_match_the_oracle_with_equal_gradients(op_calls):
    m = tiny(seed=1)
    g = torch.Generator().manual_seed(5)

    def r(k):
        return torch.randint(0, V, (k,), generator=g).tolist()
    pairs = [(r(6), r(9), r(4)), (r(3), r(5), r(11)), (r(10), r(2), r(7))]
    want = []
    for k in (1, 2):
        for p in pairs:
            ids = torch.tensor([p[0] + p[k]])
            lab = ids.clone()
            lab[:, :len(p[0])] = -100
            want.append(oracle(m, ids, lab)[0].sum())
    want = torch.stack(want)
    ref = want.float() + torch.linspace(-1, 1, 6)
    grads = {}
    dense = {packing: pack_pairs(pairs, packing=packing) for packing in ("padded", "padding_free")}
    varlen = tiny()                     # the same weights, alignkit's varlen attention
    varlen.load_state_dict(m.state_dict())
    register()
    varlen.set_attn_implementation(VARLEN)
    for packing, model in (("padded", m), ("padding_free", m), ("padded varlen", varlen),
                           ("padding_free varlen", varlen)):
        m = model
        batch = pack_pairs(pairs, packing=packing.split()[0],
                           attention="varlen" if "varlen" in packing else "dense")
        if "varlen" in packing:         # no mask: ones, and the layout the attention reads
            assert batch["attention_mask"].ndim == 2 and bool(batch["attention_mask"].all())
            assert batch["alignkit_layout"] is not None
            assert batch["sequence_ids"].equal(dense[packing.split()[0]]["sequence_ids"])
        before = len(op_calls)
        sums, counts = sequence_logprobs_from_model(m, batch)
        assert len(op_calls) == before + 1           # alignkit's head op scored the batch
        torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=2e-4)
        assert counts.tolist() == [9, 5, 2, 4, 11, 7]
        loss, metrics = fused_preference_loss(m, batch, loss="dpo", ref_logprobs=ref, beta=0.3)
        assert op_calls[before:] == ["linear_logprobs_stats", "preference_loss"]
        exp, _ = dpo_loss(want[:3].float(), want[3:].float(), ref[:3], ref[3:], beta=0.3)
        torch.testing.assert_close(loss, exp, rtol=1e-4, atol=1e-5)
        assert "rewards/accuracies" in metrics
        m.zero_grad()
        loss.backward()
        grads[packing] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for packing in ("padding_free", "padded varlen", "padding_free varlen"):
        for n in grads["padded"]:
            torch.testing.assert_close(grads[packing][n], grads["padded"][n], rtol=1e-4,
                                       atol=1e-6)
    with pytest.raises(ValueError, match="has 'sdpa', which would ignore it"):
        sequence_logprobs_from_model(tiny(), pack_pairs(pairs, packing="padding_free",
                                                        attention="varlen"))


def test_helper_bad_batches():
    m = tiny()
    with pytest.raises(KeyError, match="labels"):
        sequence_logprobs_from_model(m, {"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="labels must have the shape"):
        sequence_logprobs_from_model(m, {"input_ids": torch.zeros(2, 4, dtype=torch.long),
                                         "labels": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="packing must be padded or padding_free"):
        pack_pairs([([1], [2], [3])], packing="shared_prompt")


def test_all_masked_batch_keeps_the_graph_and_the_field_dtypes():
    from alignkit.integrations.head import fused_forward
    m = tiny()
    ids = torch.randint(0, V, (2, 9))
    out = fused_forward(m, input_ids=ids, labels=torch.full_like(ids, -100),
                        outputs=("log_probs", "entropy", "is_top1", "mean_logits"))
    assert out.is_top1.dtype == torch.bool and not out.is_top1.any()
    assert out.log_probs.abs().sum() == 0 and out.loss == 0
    out.loss.backward()                          # a differentiable zero, not an error
    assert m.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("pairs", [1, 2])
def test_fused_preference_loss_reaches_the_single_pass(monkeypatch, op_calls, kept_rows, pairs):
    """A tied loss: the default grad_mode takes the single pass inside the model's call (with
    two pairs, the second pair's G kept within the keep budget); the loss, metrics and
    gradients equal the recompute's."""
    import alignkit.ops.pair_pass as sp
    ran = []
    real = sp._grads
    monkeypatch.setattr(sp, "_grads", lambda *a: ran.append(1) or real(*a))
    m = tiny(seed=2)
    g = torch.Generator().manual_seed(6)

    def r(k):
        return torch.randint(0, V, (k,), generator=g).tolist()
    batch = pack_pairs([(r(5), r(8), r(3)), (r(4), r(2), r(6))][:pairs], packing="padding_free")
    runs = {}
    for mode in ("auto", "recompute"):
        m.zero_grad()
        loss, metrics = fused_preference_loss(m, batch, loss="simpo", beta=2.0, gamma=0.5,
                                              grad_mode=mode)
        loss.backward()
        runs[mode] = (loss.detach(), metrics, {n: p.grad.clone() for n, p in m.named_parameters()})
    assert len(ran) == 1 and op_calls == ["preference_loss"] * 2
    assert kept_rows == ([] if pairs == 1 else [min(8 + 3, 2 + 6)])   # the shorter pair's tokens
    (la, ma, ga), (lr, mr, gr) = runs["auto"], runs["recompute"]
    torch.testing.assert_close(la, lr, rtol=1e-5, atol=1e-6)
    for k in mr:
        torch.testing.assert_close(ma[k], mr[k], rtol=1e-5, atol=1e-5)
    for n in gr:
        torch.testing.assert_close(ga[n], gr[n], rtol=1e-4, atol=1e-6)
