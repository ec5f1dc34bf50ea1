"""The README's quick starts run as written, offline: the TRL drop-in (on the tiny model, tokenizer
and dataset that docs/dropins.md's setup block builds), the plain loop with preference_loss and
policy_loss, and `alignkit train` on the README's YAML (every key validated by TrainConfig, then
2 steps through the CLI with the model and data swapped for tiny local ones)."""
import os
import re

import pytest
import yaml

pytest.importorskip("trl")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(path, lang):
    return re.findall(rf"```{lang}\n(.*?)```", open(os.path.join(REPO, path), encoding="utf-8").read(),
                      re.S)


def test_readme_has_three_short_quick_starts():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert len(text.split("\n")) <= 250
    quick = [b for lang in ("python", "yaml") for b in blocks("README.md", lang)]
    # the three quick starts, then the short SFT / distillation and tensor-parallel examples
    assert len(quick) >= 3 and all(len(b.strip().split("\n")) <= 15 for b in quick)
    assert [h for h in re.findall(r"^## (Quick start \d)", text, re.M)] == [
        "Quick start 1", "Quick start 2", "Quick start 3"]


def test_quick_start_trl(tmp_path, monkeypatch, op_calls):
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(blocks("docs/dropins.md", "python")[0], "docs/dropins.md setup", "exec"), ns)
    exec(compile(blocks("README.md", "python")[0], "README.md quick start 1", "exec"), ns)
    assert ns["trainer"].state.global_step == 2 and len(op_calls) >= 2, op_calls


def test_quick_start_loop(monkeypatch):
    import alignkit
    calls = []
    for name in ("preference_loss", "policy_loss"):
        real = getattr(alignkit, name)
        monkeypatch.setattr(alignkit, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n),
                                                                                _r(*a, **k))[1])
    ns = {}
    exec(compile(blocks("README.md", "python")[1], "README.md quick start 2", "exec"), ns)
    assert calls == ["preference_loss", "policy_loss"]
    assert ns["loss"].isfinite() and ns["hidden"].grad is not None and ns["hidden"].grad.abs().sum() > 0
    # the SFT / distillation example continues quick start 2's namespace
    for name in ("sft_loss", "distill_loss"):
        real = getattr(alignkit, name)
        monkeypatch.setattr(alignkit, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n),
                                                                                _r(*a, **k))[1])
    ns["hidden"].grad = None
    exec(compile(blocks("README.md", "python")[2], "README.md SFT and distillation", "exec"), ns)
    assert calls[2:] == ["sft_loss", "distill_loss"]
    assert ns["loss"].isfinite() and ns["hidden"].grad.abs().sum() > 0


def test_quick_start_yaml(tmp_path, monkeypatch):
    from alignkit.cli import main
    from alignkit.train.config import TrainConfig
    from tiny_run import MODEL, make_setup
    cfg = yaml.safe_load(blocks("README.md", "yaml")[0])
    TrainConfig(**cfg)                                   # every key of the README's YAML is valid
    (cmd,) = [c for c in blocks("README.md", "bash")[-1].split("\n") if c.startswith("alignkit")]
    argv = cmd.split("#")[0].split()[1:]
    assert argv[:2] == ["train", "dpo.yaml"], argv
    setup = make_setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dpo.yaml").write_text(blocks("README.md", "yaml")[0])
    tiny = dict(model="null", model_config=yaml.safe_dump(MODEL, default_flow_style=True).strip(),
                tokenizer=str(setup / "tok"), data=str(setup / "train.jsonl"), max_steps=2,
                max_length=40, max_prompt_length=24, precision="fp32", progress="false",
                tensorboard="false", reference_cache_dir=str(setup / "cache"), output_dir="out")
    over = [x for k, v in tiny.items() for x in (f"--{k}", str(v))]
    assert main(argv + over) == 0
    assert os.path.isfile(tmp_path / "out" / "final" / "config.json")


def test_headline_table_is_the_rendered_rows():
    """Every row of the README's headline table is a row of the bench's own record (the one
    bench/RESULTS.md renders), so the two cannot drift."""
    import json
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## How it compares")[1].split("\n## ")[0]
    rows = [[c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            for line in section.split("\n") if line.startswith("| ") and "---" not in line]
    assert rows[0] == ["method", "time (s)", "x floor", "peak MiB", "x memory floor"], rows[0]
    assert "xeon-amx-2core" in section
    with open(os.path.join(REPO, "bench/out/rows/xeon-amx-2core/"
                                 "alignkit_bench_dpo_H4096_V128256.json")) as f:
        recorded = [r[:5] for r in json.load(f)["tables"][0]["rows"]]
    assert len(rows) > 5 and all(r in recorded for r in rows[1:]), rows


def test_tensor_parallel_example(monkeypatch):
    """The README's DTensor head example runs on a 1-rank gloo group, through the vocab-parallel
    op (counted), and leaves no process group behind."""
    import torch.distributed as dist
    from alignkit.ops import vocab_parallel
    calls = []
    real = vocab_parallel._VocabParallelLogprobs.apply
    monkeypatch.setattr(vocab_parallel._VocabParallelLogprobs, "apply",
                        lambda *a: (calls.append(1), real(*a))[1])
    created = not dist.is_initialized()
    ns = {}
    try:
        exec(compile(blocks("README.md", "python")[3], "README.md tensor parallel", "exec"), ns)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    assert calls and ns["W"].grad is not None and ns["W"].grad.placements == ns["W"].placements
