"""Every ```python block in docs/ runs as written, offline, on CPU: a page's blocks in order in one
namespace (a page's first block may set up what the later ones use), from a scratch directory.
A block that needs a GPU opts out with the line ``<!-- docs-test: skip (needs a GPU) -->`` just
above it; nothing else may opt out. The README's blocks run in tests/test_readme.py, the drop-ins
page's with checks of its own here (test_dropins_snippets_run), since both assert more than "it ran".
"""
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
SKIP = "<!-- docs-test: skip (needs a GPU) -->"
OWN_TEST = {"dropins.md"}
_BLOCK = re.compile(r"(<!-- docs-test:[^>]*-->\n)?```python\n(.*?)```", re.S)


def python_blocks(path):
    """[(code, skipped)] of a Markdown file's python blocks, in order; a docs-test marker other
    than SKIP is an error (so a typo cannot silently skip a block)."""
    out = []
    for marker, code in _BLOCK.findall(open(path, encoding="utf-8").read()):
        if marker and marker.strip() != SKIP:
            raise ValueError(f"{path}: unknown marker {marker.strip()!r}; only {SKIP!r}")
        out.append((code, bool(marker)))
    return out


PAGES = sorted(os.path.relpath(p, DOCS) for p in glob.glob(os.path.join(DOCS, "**", "*.md"),
                                                           recursive=True))


def run_page(rel, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns, ran = {"__name__": f"docs_{rel}"}, 0
    for i, (code, skipped) in enumerate(python_blocks(os.path.join(DOCS, rel))):
        if not skipped:
            exec(compile(code, f"docs/{rel} block {i}", "exec"), ns)
            ran += 1
    return ns, ran


@pytest.mark.parametrize("rel", [p for p in PAGES if p not in OWN_TEST
                                 and python_blocks(os.path.join(DOCS, p))])
def test_page_blocks_run(rel, tmp_path, monkeypatch):
    blocks = python_blocks(os.path.join(DOCS, rel))
    _, ran = run_page(rel, tmp_path, monkeypatch)
    assert ran == sum(not s for _, s in blocks)


def test_collector_finds_and_refuses(tmp_path):
    """The collector reads blocks, honours the GPU marker and refuses any other marker."""
    page = tmp_path / "p.md"
    page.write_text(f"```python\na = 1\n```\n{SKIP}\n```python\nraise SystemExit\n```\n")
    assert python_blocks(page) == [("a = 1\n", False), ("raise SystemExit\n", True)]
    page.write_text("<!-- docs-test: skip -->\n```python\na = 1\n```\n")
    with pytest.raises(ValueError, match="unknown marker"):
        python_blocks(page)
    assert len(PAGES) >= 10 and "dropins.md" in PAGES


def test_dropins_snippets_run(tmp_path, monkeypatch, op_calls):
    """docs/dropins.md: setup builds only; TRL (2 steps), HF Trainer (2 steps), the loop and
    patch_model all run alignkit's head op (the RL block calls policy_loss on hidden states
    itself), and TRL's GRPOTrainer trains through it."""
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    ns, ran = {}, []
    for i, (code, skipped) in enumerate(python_blocks(os.path.join(DOCS, "dropins.md"))):
        assert not skipped
        before = len(op_calls)
        exec(compile(code, f"docs/dropins.md block {i}", "exec"), ns)
        ran.append(len(op_calls) - before)
    assert len(ran) == 7
    assert ran[0] == 0 and all(n >= 1 for n in ran[1:5]) and ran[6] >= 2, ran
    assert ns["trainer"].state.global_step == 2 and ns["hf"].state.global_step == 2
    assert ns["loss"].isfinite() and ns["ratio"].shape == (2, 11)
    assert ns["out"].entropy is not None
    assert ns["loss"].isfinite() and ns["metrics"]["entropy"] > 0
    assert ns["grpo"].state.global_step == 2
