"""The drop-in's head against TRL 1.16's own fused head (trl.trainer.utils.add_fused_lm_head) on
the same model: GRPOConfig.cast_lm_head_to_fp32 under bf16 autocast (fp32 GEMMs, autocast off),
and the fields computed by one more pass over the vocabulary: mean_logits under Gemma-2's
final_logit_softcapping and log_sum_sq_probs (WPO). Each field and each gradient is compared."""
import copy
import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from alignkit.integrations.head import install_fused_forward  # noqa: E402
from alignkit.integrations.trl import patch_trainer  # noqa: E402

FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _batch(V, B=3, L=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, -3:] = -100
    return ids, labels


def _gemma2(softcap=5.0, V=300):
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64, final_logit_softcapping=softcap,
                                    attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():                        # logits large enough that the cap bites
        m.lm_head.weight.mul_(40.0)
    return m


@pytest.mark.parametrize("softcap", [5.0, None])
def test_softcap_mean_logits_and_log_sum_sq_probs_match_trls_head(softcap):
    ours = _gemma2(softcap)
    theirs = copy.deepcopy(ours)
    add_fused_lm_head(theirs, temperature=0.7, outputs=FIELDS)
    install_fused_forward(ours, outputs=FIELDS, temperature=0.7, on="fused_lm_head")
    ids, labels = _batch(ours.config.vocab_size)
    a = theirs(ids, labels=labels, fused_lm_head=True)
    b = ours(ids, labels=labels, fused_lm_head=True)
    mask = labels[:, 1:] != -100
    for k in FIELDS:
        x, y = getattr(a, k), getattr(b, k)
        assert y is not None, k
        if k == "is_top1":
            assert torch.equal(x & mask, y & mask)
            continue
        torch.testing.assert_close(y * mask, x * mask, rtol=2e-5, atol=2e-5, msg=k)
    if softcap:                                   # the cap changed the mean (the test can fail)
        raw = (ours.model(ids).last_hidden_state[:, :-1] @ ours.lm_head.weight.T) / 0.7
        assert ((raw.mean(-1) - b.mean_logits).abs() * mask).max() > 0.1
    (a.log_probs.sum() + a.entropy.sum()).backward()
    (b.log_probs.sum() + b.entropy.sum()).backward()
    torch.testing.assert_close(ours.lm_head.weight.grad, theirs.lm_head.weight.grad,
                               rtol=1e-4, atol=1e-5)


def test_unknown_outputs_are_refused_when_patching_not_at_the_first_forward():
    m = _gemma2()
    with pytest.raises(NotImplementedError, match=r"output\(s\) \['logits'\]"):
        install_fused_forward(m, outputs=("log_probs", "logits"), on="fused_lm_head")
    assert "forward" not in m.__dict__             # nothing was installed


def _grpo(tok, tmp_path, cast):
    path = str(tmp_path / "init")
    if not os.path.isdir(path):
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=128,
                                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():
            m.lm_head.weight.mul_(8.0)
        m.save_pretrained(path)
        tok.save_pretrained(path)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2,
                          num_generations=2, max_completion_length=4, report_to="none",
                          use_cpu=True, bf16=False, cast_lm_head_to_fp32=cast, beta=0.04,
                          temperature=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.GRPOTrainer(model=path, args=args, processing_class=tok,
                               reward_funcs=lambda completions, **k: [0.0] * len(completions),
                               train_dataset=datasets.Dataset.from_list([{"prompt": "hi"}] * 4))


@pytest.mark.parametrize("cast", [True, False])
def test_grpo_cast_lm_head_to_fp32_under_bf16_autocast_matches_unpatched_trl(
        bpe_tokenizer, tmp_path, cast, op_calls):
    """TRL with cast_lm_head_to_fp32=True runs the head in fp32 outside autocast; patched, the
    fields and the head's gradient agree with it to fp32 round-off, where a bf16 head would
    miss by bf16's (~1e-2). With cast=False both run the head in bf16 (a looser match)."""
    tok = transformers.AutoTokenizer.from_pretrained(bpe_tokenizer)
    tr = _grpo(tok, tmp_path, cast)
    m = tr.model
    if cast:
        assert m.lm_head.weight.dtype == torch.float32
    ids, labels = _batch(len(tok), L=24, seed=1)

    def call():
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), m.lm_head.weight.grad.clone()

    want = call()
    n = len(op_calls)
    patch_trainer(tr)
    got = call()
    assert len(op_calls) > n                        # alignkit's head answered
    mask = labels[:, 1:] != -100
    tol = 2e-4 if cast else 6e-2
    for name, x, y in zip(("log_probs", "entropy", "weight grad"), want, got):
        if name != "weight grad":
            x, y = x * mask, y * mask
        err = (x - y).abs().max().item()
        assert err < tol * max(1.0, x.abs().max().item()), (name, err)
    if cast:            # the bf16 head (what the drop-in ran before) misses by far more
        lp_bf16 = torch.log_softmax(
            (m.model(ids).last_hidden_state[:, :-1].bfloat16() @
             m.lm_head.weight.bfloat16().T).float() / 0.9, -1)
        lp_bf16 = lp_bf16.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * mask
        assert (lp_bf16 - want[0] * mask).abs().max() > 20 * tol
