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


def test_readme_snippets_run(tmp_path, monkeypatch):
    blocks = snippets()
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    ns = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md snippet {i}", "exec"), ns)
    assert ns["trainer"].state.global_step == 2 and ns["hf"].state.global_step == 2
    assert ns["loss"].isfinite() and ns["ratio"].shape == (2, 11)
    assert ns["out"].entropy is not None
