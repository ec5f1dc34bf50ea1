"""bench/RESULTS.md is a fresh render of the benches' rows (bench/out/rows/, bench/baselines/) by
bench/render_results.py, and a bench's --write lands in that render (issue #38)."""
import json
import os

from alignkit.bench import harness
from bench import render_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_md_is_a_fresh_render():
    with open(render_results.RESULTS, encoding="utf-8") as f:
        assert f.read() == render_results.render(), \
            "bench/RESULTS.md is stale: run `python -m bench.render_results` (make results)"


def test_a_written_run_is_rendered(tmp_path, monkeypatch):
    """harness.write_rows parses a bench's Markdown table into rows; the render shows it under
    the machine's class, with its command and date, and a changed cell changes the render."""
    text = "machine: x\n\n| method | x floor |\n|---|---|\n| alignkit | 1.07x |\n| naive | 1.61x |\n"
    monkeypatch.setattr(harness, "this_machine_class", lambda: "testcpu-avx2-2core")
    path = harness.write_rows("probe", "python -m bench.probe --write", text, root=str(tmp_path))
    doc = json.load(open(path))
    assert doc["tables"] == [{"header": ["method", "x floor"],
                              "rows": [["alignkit", "1.07x"], ["naive", "1.61x"]]}]
    monkeypatch.setattr(render_results, "ROWS", str(tmp_path))
    monkeypatch.setattr(render_results, "BASELINES", str(tmp_path / "none"))
    page = render_results.render()
    assert "## testcpu-avx2-2core" in page and "`python -m bench.probe --write`" in page
    assert "| alignkit | 1.07x |" in page and f"date {doc['date']}" in page
    doc["tables"][0]["rows"][0][1] = "1.08x"
    json.dump(doc, open(path, "w"))
    assert render_results.render() != page


def test_alignkit_bench_write(tmp_path, monkeypatch):
    """`alignkit bench ... --write NAME` saves its table as rows, with the command that ran."""
    from alignkit.bench import cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "this_machine_class", lambda: "testcpu-avx2-2core")
    argv = ["--hidden", "16", "--vocab", "64", "--tokens", "64", "--loss", "dpo", "--no-peers",
            "--reps", "1", "--no-memory", "--no-progress", "--dtype", "fp32"]
    cli.run(argv + ["--write", "tiny"], log=lambda *a: None)
    doc = json.load(open(tmp_path / "bench/out/rows/testcpu-avx2-2core/tiny.json"))
    assert doc["command"] == "alignkit bench " + " ".join(argv)
    methods = [r[0] for r in doc["tables"][0]["rows"]]
    assert any(m.startswith("alignkit") for m in methods) and any("floor" in m for m in methods)
