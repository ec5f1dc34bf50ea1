"""The README's drop-in snippets run as written, in order, offline."""
import os
import re

import pytest

pytest.importorskip("trl")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def snippets():
    text = open(README, encoding="utf-8").read()
    section = text.split("<!-- snippets:start")[1].split("<!-- snippets:end -->")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_snippets_run(tmp_path, monkeypatch, op_calls):
    blocks = snippets()
    assert len(blocks) == 7
    monkeypatch.chdir(tmp_path)
    ns = {}
    ran = []
    for i, code in enumerate(blocks):
        before = len(op_calls)
        exec(compile(code, f"README.md snippet {i}", "exec"), ns)
        ran.append(len(op_calls) - before)
    # setup builds only; TRL (2 steps), HF Trainer (2 steps), the loop and patch_model all run
    # alignkit's head op (the RL block calls policy_loss on hidden states itself)
    assert ran[0] == 0 and all(n >= 1 for n in ran[1:5]) and ran[6] >= 2, ran
    assert ns["trainer"].state.global_step == 2 and ns["hf"].state.global_step == 2
    assert ns["loss"].isfinite() and ns["ratio"].shape == (2, 11)
    assert ns["out"].entropy is not None
    assert ns["loss"].isfinite() and ns["metrics"]["entropy"] > 0
    assert ns["grpo"].state.global_step == 2
