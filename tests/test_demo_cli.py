"""The README's main command, as a new user runs it (shorter), and the CLI's error path."""
import os
import re

import pytest

pytest.importorskip("transformers")

from alignkit.cli import main  # noqa: E402


def test_demo_learns_the_preference_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--max-steps", "60"]) == 0
    text = capsys.readouterr().out
    acc = float(re.search(r"held-out reward accuracy after 60 steps: ([0-9.]+)", text).group(1))
    assert acc > 0.8, text[-2000:]
    for f in ("metrics.jsonl", "rewards.png", "final/config.json", "final/model.safetensors",
              "checkpoints/step-00000060/model.safetensors"):
        assert os.path.isfile(out / f), f
    assert main(["plot", str(out), "--out", str(tmp_path / "p.png")]) == 0
    assert os.path.getsize(tmp_path / "p.png") > 10_000


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_config: {model_type: llama}\ntokenizer: tok\npacking: flat\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error: packing must be one of padded, padding_free, shared_prompt" in err
    assert main(["train", str(cfg), "--packing", "padded", "--data",
                 str(tmp_path / "none.json")]) == 2
    assert f"data: {str(tmp_path / 'none.json')!r} is not a file" in capsys.readouterr().err
    (tmp_path / "d.json").write_text("[]")
    assert main(["train", str(cfg), "--packing", "padded", "--data", str(tmp_path / "d.json")]) == 2
    assert "tokenizer: 'tok' is not a local directory" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
