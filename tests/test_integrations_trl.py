"""patch_trainer against the real TRL 1.16 trainers: a tiny random Llama, a locally trained
tokenizer and rows of ../shared/data/dpo_en_demo.json; the unpatched trainer is the reference,
step by step, for the loss and every logged metric."""
import copy
import json
import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from alignkit.integrations.trl import patch_trainer  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def pair_rows(data_dir):
    with open(os.path.join(data_dir, "dpo_en_demo.json")) as f:
        rows = json.load(f)
    # rows whose prompt leaves room for a response within max_length (TRL gives NaN metrics on
    # an empty completion, patched or not)
    rows = [r for r in rows if sum(len(m["value"]) for m in r["conversations"]) < 600][:12]
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    out = []
    for r in rows:
        prompt = [{"role": role[m["from"]], "content": m["value"]} for m in r["conversations"]]
        out.append({"prompt": prompt,
                    "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}]})
    return out


@pytest.fixture(scope="module")
def kto_rows(data_dir):
    with open(os.path.join(data_dir, "kto_en_demo.json")) as f:
        rows = json.load(f)[:16]
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:],
             "label": r["label"]} for r in rows]


def model(tok, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def run(trainer_cls, config_cls, tok, rows, tmp_path, patch, ref=False, calls=None, **cfg):
    m = model(tok)
    before = len(calls) if calls is not None else 0
    kw = dict(output_dir=str(tmp_path / ("p" if patch else "u")), per_device_train_batch_size=2,
              max_steps=STEPS, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
              save_strategy="no", learning_rate=1e-3, seed=0, disable_tqdm=True,
              dataloader_num_workers=0, max_length=96)
    kw.update(cfg)
    args = config_cls(**kw)
    extra = {"ref_model": copy.deepcopy(m)} if ref else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = trainer_cls(model=m, args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(rows), **extra)
        if patch:
            assert patch_trainer(tr) is tr
        tr.train()
    if calls is not None:             # alignkit's op ran in every patched step, never unpatched
        ran = len(calls) - before
        assert (ran >= STEPS) if patch else (ran == 0), (patch, ran)
    return [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]


def compare(a, b):
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), 1):
        keys = {k for k in x if not k.startswith(("epoch", "grad_norm", "learning_rate",
                                                   "num_tokens", "step"))}
        assert keys <= set(y), keys - set(y)
        # rewards are β·(logp − ref logp): differences of sums over ~100 tokens, so their error
        # is fp32's on the sums (|logp| ~ 300 -> ~1e-4), not on the small difference
        scale = max(abs(x.get("logps/chosen", 0.0)), abs(x.get("logps/rejected", 0.0)), 1.0)
        for k in sorted(keys):
            tol = 1e-6 * scale if k.startswith("rewards/") else 2e-5
            assert y[k] == pytest.approx(x[k], rel=2e-4, abs=tol), (step, k, x[k], y[k])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=2e-3), step


DPO_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"}


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type=["ipo"], beta=0.5),
    dict(loss_type=["hinge"], precompute_ref_log_probs=True),
    dict(loss_type=["apo_zero"], label_smoothing=0.0),
    dict(loss_type=["sigmoid"], label_smoothing=0.1),
    dict(loss_type=["sigmoid", "ipo"], use_weighting=True),
], ids=["sigmoid", "sigmoid+sft", "ipo", "hinge-precomputed", "apo_zero", "cdpo", "wpo"])
def test_dpo_trainer_patched_matches_unpatched(tok, pair_rows, tmp_path, cfg, op_calls):
    ref = not cfg.get("precompute_ref_log_probs", False)
    a = run(trl.DPOTrainer, trl.DPOConfig, tok, pair_rows, tmp_path, False, ref=ref,
            calls=op_calls, **cfg)
    b = run(trl.DPOTrainer, trl.DPOConfig, tok, pair_rows, tmp_path, True, ref=ref,
            calls=op_calls, **cfg)
    # the metrics compare() checks include these (it compares every key the unpatched run logs)
    assert DPO_KEYS <= set(a[0]), DPO_KEYS - set(a[0])
    compare(a, b)


def test_kto_trainer_patched_matches_unpatched(tok, kto_rows, tmp_path, op_calls):
    from trl import KTOConfig, KTOTrainer
    a = run(KTOTrainer, KTOConfig, tok, kto_rows, tmp_path, False, ref=True, calls=op_calls)
    b = run(KTOTrainer, KTOConfig, tok, kto_rows, tmp_path, True, ref=True, calls=op_calls)
    compare(a, b)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_cpo_trainer_patched_matches_unpatched(tok, pair_rows, tmp_path, loss_type, op_calls):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    kw = dict(loss_type=loss_type, max_length=512)
    if loss_type == "simpo":
        kw["cpo_alpha"] = 0.0
    a = run(CPOTrainer, CPOConfig, tok, pair_rows, tmp_path, False, calls=op_calls, **kw)
    b = run(CPOTrainer, CPOConfig, tok, pair_rows, tmp_path, True, calls=op_calls, **kw)
    compare(a, b)


def test_orpo_trainer_patched_matches_unpatched(tok, pair_rows, tmp_path, op_calls):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    a = run(ORPOTrainer, ORPOConfig, tok, pair_rows, tmp_path, False, max_length=512,
            calls=op_calls)
    b = run(ORPOTrainer, ORPOConfig, tok, pair_rows, tmp_path, True, max_length=512,
            calls=op_calls)
    compare(a, b)


def test_unservable_options_are_refused_by_name(tok, pair_rows, tmp_path):
    with pytest.raises(TypeError, match="serves TRL's DPOTrainer"):
        patch_trainer(object())


@pytest.fixture(scope="module")
def prompt_rows(pair_rows):
    return [{"prompt": r["prompt"]} for r in pair_rows[:8]]


def _reward(completions, **kw):
    """A reward written here: longer completions with more distinct characters score higher."""
    text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t)) / 10.0 - abs(len(t) - 20) / 40.0 for t in text]


@pytest.mark.parametrize("trainer_name,cfg", [
    ("GRPOTrainer", dict(loss_type="dapo")),
    ("GRPOTrainer", dict(loss_type="grpo", beta=0.04)),
    ("GRPOTrainer", dict(loss_type="bnpo", entropy_coef=0.01, temperature=0.8)),
    ("GRPOTrainer", dict(loss_type="dr_grpo")),
    ("GRPOTrainer", dict(loss_type="cispo", epsilon_high=2.0)),
    ("GRPOTrainer", dict(loss_type="sapo")),
    ("GRPOTrainer", dict(loss_type="luspo", importance_sampling_level="sequence")),
    ("RLOOTrainer", dict()),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_rl_trainers_patched_match_unpatched(tok, prompt_rows, tmp_path, op_calls, trainer_name,
                                             cfg):
    """TRL's GRPOTrainer and RLOOTrainer, patched and unpatched, step by step: the same loss,
    every logged metric and the same gradient norm; alignkit's op answers every scoring call."""
    trainer_cls = getattr(trl, trainer_name)
    config_cls = getattr(trl, trainer_name.replace("Trainer", "Config"))
    kw = dict(num_generations=2, max_completion_length=8, generation_batch_size=4,
              reward_funcs=_reward, **cfg)
    a = run_rl(trainer_cls, config_cls, tok, prompt_rows, tmp_path, False, op_calls, **kw)
    b = run_rl(trainer_cls, config_cls, tok, prompt_rows, tmp_path, True, op_calls, **kw)
    compare(a, b)


def run_rl(trainer_cls, config_cls, tok, rows, tmp_path, patch, calls, reward_funcs, **cfg):
    # from a saved directory: with beta > 0 TRL builds the reference model from the policy's path
    m = str(tmp_path / "init")
    if not os.path.isdir(m):
        model(tok).save_pretrained(m)
        tok.save_pretrained(m)
    before = len(calls)
    args = config_cls(output_dir=str(tmp_path / ("p" if patch else "u")),
                      per_device_train_batch_size=4, max_steps=STEPS, logging_steps=1,
                      report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                      learning_rate=1e-3, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                      **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = trainer_cls(model=m, args=args, processing_class=tok, reward_funcs=reward_funcs,
                         train_dataset=datasets.Dataset.from_list(rows))
        if patch:
            assert patch_trainer(tr) is tr
        torch.manual_seed(0)
        tr.train()
    ran = len(calls) - before
    assert (ran >= STEPS) if patch else (ran == 0), (patch, ran)
    return [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
