"""The loop end to end on a tiny random Llama: every loss, reference modes and their cache,
eval records, the saved model, resume after SIGKILL, and DDP / FSDP2 against one process."""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alignkit.train import PreferenceTrainer  # noqa: E402
from alignkit.train.metrics import read_metrics  # noqa: E402
from tiny_run import MODEL, assert_weights_close, config, final_weights, make_setup  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("tiny"))


KEYS = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
        "rewards/accuracies", "tokens_per_second"}


@pytest.mark.parametrize("loss,packing,extra", [
    ("dpo", "padded", {"reference": "live", "loss_options": {"loss_type": ["sigmoid", "sft"],
                                                             "loss_weights": [1.0, 0.5]}}),
    ("simpo", "shared_prompt", {"loss_options": {"beta": 2.0, "gamma": 0.5}}),
    ("orpo", "padding_free", {"precision": "bf16", "gradient_checkpointing": True}),
    ("cpo", "padded", {"loss_options": {"loss_type": "hinge"}}),
    ("kto", "padding_free", {"data": "kto.json", "eval_data": None, "eval_fraction": 0.2}),
])
def test_every_loss_trains_and_logs(setup, tmp_path, loss, packing, extra):
    if "data" in extra:
        extra = dict(extra, data=str(setup / extra["data"]))
    cfg = config(setup, tmp_path, loss=loss, packing=packing, **extra)
    PreferenceTrainer(cfg).train()
    recs = read_metrics(str(tmp_path))
    train = [r for r in recs if r.get("split", "train") == "train"]
    evals = [r for r in recs if r.get("split") == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3] and len(evals) == 1
    need = KEYS if loss != "kto" else KEYS - {"rewards/margins", "rewards/accuracies"}
    for r in train + evals:
        assert need - {"tokens_per_second"} <= set(r), set(r)
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert all(r["tokens_per_second"] > 0 for r in train)
    assert train[0]["loss"] != train[-1]["loss"]
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert m.config.hidden_size == 32


def test_precompute_matches_live_and_hits_its_cache(setup, tmp_path):
    logs = []
    cfg = config(setup, tmp_path / "pre", reference="precompute",
                 reference_cache_dir=str(tmp_path / "cache"))
    PreferenceTrainer(cfg, log=logs.append).train()
    PreferenceTrainer(config(setup, tmp_path / "live", reference="live")).train()
    pre, live = (read_metrics(str(tmp_path / d)) for d in ("pre", "live"))
    for a, b in zip(pre, live):
        for k in ("loss", "rewards/chosen", "rewards/margins"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert any("computed 40 examples" in m for m in logs)
    logs.clear()
    PreferenceTrainer(dict(cfg, output_dir=str(tmp_path / "again")), log=logs.append).train()
    assert sum("cache hit" in m for m in logs) == 2          # train and eval sets
    again = read_metrics(str(tmp_path / "again"))
    for a, b in zip(pre, again):
        assert a["loss"] == b["loss"] and a["rewards/margins"] == b["rewards/margins"]


KILLER = """
import os, signal, sys
from alignkit.train import PreferenceTrainer, TrainConfig
cfg = TrainConfig.from_yaml(sys.argv[1])
def die(trainer, step, rec):
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
PreferenceTrainer(cfg, callbacks=[die]).train()
"""


def test_resume_after_sigkill_reaches_the_same_weights(setup, tmp_path):
    import yaml
    common = dict(max_steps=8, save_steps=3, eval_steps=4)
    PreferenceTrainer(config(setup, tmp_path / "full", **common)).train()
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config(setup, tmp_path / "killed", **common)))
    (tmp_path / "killer.py").write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(cfg_path), "5"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ckpts = sorted(os.listdir(tmp_path / "killed" / "checkpoints"))
    assert ckpts == ["step-00000003"], ckpts          # killed after step 5, before step 6's save
    p = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", str(cfg_path), "--resume"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "step 3" in p.stdout
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    steps = [r["step"] for r in read_metrics(str(tmp_path / "killed"))
             if r.get("split", "train") == "train"]
    assert steps == list(range(1, 9))



@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_resume_after_sigkill(setup, tmp_path, fsdp):
    """DDP or FSDP2 (gloo, 2 ranks) killed after step 3 resumes from step 2's checkpoint (the
    full state dicts, one RNG file per rank) and reaches the weights of one uninterrupted rank
    with twice the accumulation."""
    import yaml
    one = config(setup, tmp_path / "one", max_steps=4, save_steps=2, eval_steps=0, batch_size=2,
                 grad_accum=2, reference="precompute")
    PreferenceTrainer(one).train()
    two = dict(one, output_dir=str(tmp_path / "two"), grad_accum=1, fsdp=fsdp)
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two))
    (tmp_path / "killer.py").write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    p = subprocess.run(run + [str(tmp_path / "killer.py"), str(cfg_path), "3"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    step2 = tmp_path / "two" / "checkpoints" / "step-00000002"
    assert sorted(os.listdir(step2.parent)) == ["step-00000002"], p.stderr[-3000:]
    assert {"rng-rank0.json", "rng-rank1.json", "model.safetensors"} <= set(os.listdir(step2))
    p = subprocess.run(run + ["-m", "alignkit.cli", "train", str(cfg_path), "--resume"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from" in p.stdout and "step 2" in p.stdout
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert assert_weights_close(b, a, one["lr"]) == len(b)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2-tiled-mlp"])
def test_two_ranks_match_one_rank_with_double_accumulation(setup, tmp_path, fsdp):
    """FSDP2 with the long-sequence settings: the tiled MLP's parameters enter its autograd
    function as FSDP2's unsharded tensors and their gradients leave it for the reduce-scatter."""
    import yaml
    long = dict(tiled_mlp=True, gradient_checkpointing=True) if fsdp else {}
    one = config(setup, tmp_path / "one", max_steps=3, batch_size=2, grad_accum=2,
                 reference="precompute", **long)
    PreferenceTrainer(one).train()
    two = dict(one, output_dir=str(tmp_path / "two"), grad_accum=1, fsdp=fsdp)
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", "-m", "alignkit.cli", "train",
                        str(cfg_path)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert assert_weights_close(b, a, one["lr"]) == len(b)
    ra = read_metrics(str(tmp_path / "one"))
    rb = read_metrics(str(tmp_path / "two"))
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_lora_reference_is_the_model_with_its_adapter_disabled(setup, tmp_path):
    peft = pytest.importorskip("peft")
    from alignkit.train.model import SequenceLogprobs, forward_batch
    from alignkit.train.packing import collate
    from alignkit.train.loading import model_from_config
    base = model_from_config(MODEL, seed=0)
    # non-zero B so that the adapter changes the model from the first step
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    tok = transformers.AutoTokenizer.from_pretrained(str(setup / "tok"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tr = PreferenceTrainer(config(setup, tmp_path, reference="live", max_steps=2), model=model,
                           tokenizer=tok)
    tr.train()
    assert tr.live_ref.model is model                        # no copy of the weights
    batch = collate(tr.train_ex, [0, 1, 2], "padding_free", tr.pad_id)
    ref, _ = tr.live_ref(batch)
    mod = SequenceLogprobs(model, backend="torch")
    with torch.no_grad():
        policy, _ = forward_batch(mod, batch)
        with model.disable_adapter():
            adapter_off, _ = forward_batch(mod, batch)
    torch.testing.assert_close(ref, adapter_off)
    assert (ref - policy).abs().max() > 1e-3
    for n, p in model.named_parameters():                  # only the adapter trained
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert os.path.isfile(tmp_path / "final" / "adapter_config.json")


def test_the_trainer_reaches_the_single_pass(setup, tmp_path, monkeypatch):
    """One pair per micro-batch in fp32: the default grad_mode takes the single pass in every
    training micro-batch, and the run matches the recompute's to fp32 round-off."""
    import alignkit.ops.pair_pass as sp
    ran = []
    real = sp._grads
    monkeypatch.setattr(sp, "_grads", lambda *a: ran.append(1) or real(*a))
    PreferenceTrainer(config(setup, tmp_path / "sp", batch_size=1, grad_accum=2)).train()
    assert len(ran) == 3 * 2                          # 3 steps x 2 micro-batches; eval: no grad
    PreferenceTrainer(config(setup, tmp_path / "rc", batch_size=1, grad_accum=2,
                             loss_options={"grad_mode": "recompute"})).train()
    assert len(ran) == 6
    a, b = final_weights(tmp_path / "sp"), final_weights(tmp_path / "rc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_the_engine_section_reaches_the_engine(setup, tmp_path, monkeypatch):
    """The config's engine: section is the TileOptions of every fused call: a pinned plan runs in
    every training micro-batch (the recompute: no single pass at all), and a bad key or value is
    a ConfigError naming it, before any model is built."""
    import alignkit.losses.fused as fused
    import alignkit.ops.pair_pass as sp
    from alignkit.train.config import ConfigError, TrainConfig
    ran, plans = [], []
    real = sp._grads
    monkeypatch.setattr(sp, "_grads", lambda *a: ran.append(any(a[-3:])) or real(*a))
    real_note = fused.note
    monkeypatch.setattr(fused, "note", lambda n, why: plans.append((n, why)) or real_note(n, why))
    PreferenceTrainer(config(setup, tmp_path / "rc", batch_size=1, grad_accum=2,
                             engine={"plan": "recompute"})).train()
    # 3 steps x 2 micro-batches, and the no-grad eval batches, all pinned
    assert ran == [] and plans.count(("recompute", "pinned")) >= 3 * 2
    PreferenceTrainer(config(setup, tmp_path / "sp", batch_size=1, grad_accum=2,
                             engine={"plan": "single_pass", "memory": "fast"})).train()
    assert ran.count(True) == 3 * 2                   # the training micro-batches (eval: no grad)
    with pytest.raises(ConfigError, match="engine: unknown key"):
        TrainConfig(engine={"memroy": "min"})
    with pytest.raises(ConfigError, match="memory must be one of"):
        TrainConfig(engine={"memory": "lots"})
