"""patch_trainer on TRL 1.16's DistillationTrainer: a tiny random Llama student and a wider
teacher (same vocabulary, built here: no hub), a locally trained tokenizer and prompts of
../shared/data/dpo_en_demo.json; the unpatched trainer is the reference, step by step, for the
loss, the logged entropy and the gradient norm, at beta 0, 0.5 and 1."""
import json
import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from alignkit.integrations.trl import patch_trainer  # noqa: E402
from alignkit.ops import distill_pass  # noqa: E402

STEPS = 3
MASKED = []       # completion masks with a zero, seen by either trainer's divergence


@pytest.fixture(autouse=True)
def _watch_masks(monkeypatch):
    """Records whether a completion mask had padding (see run)."""
    import trl.trainer.distillation_trainer as dt
    MASKED.clear()
    real = dt.DistillationTrainer._compute_loss

    def watched(self, student, inputs, num_items):
        if bool((inputs["completion_mask"] == 0).any()):
            MASKED.append(1)
        return real(self, student, inputs, num_items)
    monkeypatch.setattr(dt.DistillationTrainer, "_compute_loss", watched)


@pytest.fixture(scope="module")
def prompts(data_dir):
    with open(os.path.join(data_dir, "dpo_en_demo.json")) as f:
        rows = json.load(f)
    rows = [r for r in rows if sum(len(m["value"]) for m in r["conversations"]) < 300][:8]
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"prompt": [{"role": role[m["from"]], "content": m["value"]}
                        for m in r["conversations"]]} for r in rows]


def llama(tok, hidden, seed):
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden,
                                   intermediate_size=2 * hidden, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def run(tok, rows, tmp_path, patch, beta):
    student, teacher = llama(tok, 32, 0), llama(tok, 48, 1)   # different hidden sizes
    # a third of the vocabulary ends a completion: most stop before max_completion_length, so
    # the completion mask has zeros (padding) that the divergence must skip
    student.generation_config.eos_token_id = list(range(0, len(tok), 3))
    args = trl.DistillationConfig(
        output_dir=str(tmp_path / ("p" if patch else "u")), per_device_train_batch_size=2,
        max_steps=STEPS, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", learning_rate=1e-3, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, max_completion_length=8, beta=beta, temperature=0.9)
    before = sum(distill_pass.CALLS.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = trl.DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                     processing_class=tok,
                                     train_dataset=datasets.Dataset.from_list(rows))
        if patch:
            assert patch_trainer(tr) is tr
        torch.manual_seed(0)
        tr.train()
    ran = sum(distill_pass.CALLS.values()) - before   # alignkit's pass ran in every patched step
    assert (ran >= STEPS) if patch else (ran == 0), (patch, ran)
    assert MASKED, "no completion was padded: the mask was not exercised"
    return [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_trainer_patched_matches_unpatched(tok, prompts, tmp_path, beta):
    a = run(tok, prompts, tmp_path, False, beta)
    b = run(tok, prompts, tmp_path, True, beta)
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert "entropy" in x
        for k in ("loss", "entropy"):
            assert y[k] == pytest.approx(x[k], rel=2e-4, abs=2e-5), (step, k, x[k], y[k])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=2e-3), step


def test_softcapping_is_refused_by_name(tok, prompts, tmp_path):
    from alignkit.integrations.trl_distill import patch_distillation

    class Fake:
        model = llama(tok, 32, 0)
        teacher_model = llama(tok, 48, 1)
    Fake.teacher_model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="teacher's final_logit_softcapping"):
        patch_distillation(Fake())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_dropin_function_matches_trls_with_logit_scales_biases_and_num_items(beta):
    """The function the patch puts in TRL's place, against TRL's own on the same call: logit
    scales (folded into the hidden states), biases, a padded mask, num_items_in_batch; loss,
    entropy sum, valid count and the student's gradients."""
    import trl.trainer.distillation_trainer as dt

    from alignkit.integrations import trl_distill
    g = torch.Generator().manual_seed(11)
    B, K, Hs, Ht, V = 2, 5, 12, 20, 40
    hs, ht = torch.randn(B, K, Hs, generator=g), torch.randn(B, K, Ht, generator=g)
    ws, wt = torch.randn(V, Hs, generator=g) / 2, torch.randn(V, Ht, generator=g) / 3
    bs, bt = torch.randn(V, generator=g), torch.randn(V, generator=g)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, 3:] = 0
    kw = dict(num_items_in_batch=torch.tensor(7.0), student_logit_scale=0.7,
              teacher_logit_scale=1.3, temperature=0.8)
    trl_distill._hook_module()
    original = trl_distill._ORIGINAL["fn"]
    out = {}
    for who in ("trl", "alignkit"):
        leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
        args = (leaves[0], ht, leaves[1], wt, mask, beta)
        kws = dict(kw, student_lm_head_bias=leaves[2], teacher_lm_head_bias=bt)
        before = sum(distill_pass.CALLS.values())
        if who == "trl":
            res = original(*args, **kws)
            assert sum(distill_pass.CALLS.values()) == before
        else:
            token = trl_distill._ACTIVE.set(trl_distill._DEFAULT)
            try:
                res = dt._chunked_divergence_loss(*args, **kws)   # the hooked module function
            finally:
                trl_distill._ACTIVE.reset(token)
            assert sum(distill_pass.CALLS.values()) == before + 1
        out[who] = res, torch.autograd.grad(res[0], leaves)
    (l0, e0, n0), g0 = out["trl"]
    (l1, e1, n1), g1 = out["alignkit"]
    assert int(n1) == int(n0) == 8
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    assert float(e1) == pytest.approx(float(e0), rel=1e-5)
    for a, b in zip(g1, g0):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
