"""The bench tools a user runs: the regression gate against a checked-in baseline (it passes on
the baseline itself and fails against a copy edited to be 20% faster), and ``alignkit bench``'s
argument handling and output on a tiny shape (every installed peer listed, a missing one named
with its pip name)."""
import json
import os
import subprocess
import sys

from alignkit.bench import compare, methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = os.path.join(REPO, "bench", "baselines")


def _baseline():
    files = sorted(f for f in os.listdir(BASELINES) if f.endswith(".json"))
    assert files, "no baseline checked in under bench/baselines/"
    return os.path.join(BASELINES, files[0])


def test_gate_passes_on_the_baseline_and_fails_on_a_faster_copy(tmp_path):
    base = _baseline()
    assert len(compare.ratios(base)) >= 4          # alignkit cases with a ratio to the floor
    assert compare.compare(base, base, log=lambda *a: None)
    with open(base) as f:
        data = json.load(f)
    for b in data["benchmarks"]:
        if "x_floor" in b.get("extra_info", {}):
            b["extra_info"]["x_floor"] *= 0.8                # 20% faster
    faster = tmp_path / "faster.json"
    faster.write_text(json.dumps(data))
    lines = []
    assert not compare.compare(str(faster), base, log=lines.append)
    assert "FAILED" in lines[-1] and "+25.0%" in "\n".join(lines)
    p = subprocess.run([sys.executable, "-m", "alignkit.bench.compare", str(faster), base],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1, p.stdout
    data["benchmarks"] = data["benchmarks"][:1]
    (tmp_path / "few.json").write_text(json.dumps(data))
    assert not compare.compare(base, str(tmp_path / "few.json"), log=lambda *a: None)


def test_baselines_are_named_for_their_machine_class(tmp_path):
    # make bench-compare picks bench/baselines/<this machine's class>.json; a file of another
    # class is refused by the gate, naming both classes, unless --any-machine
    files = sorted(f for f in os.listdir(BASELINES) if f.endswith(".json"))
    for f in files:
        assert compare.file_class(os.path.join(BASELINES, f)) == f[:-5], f
    from alignkit.bench.harness import machine_class
    assert machine_class("Intel(R) Xeon(R) Processor", ["avx2", "avx512f", "amx_bf16"], 2) == \
        "xeon-amx-2core"
    assert machine_class("AMD EPYC", ["avx", "avx2", "fma"], 2) == "epyc-avx2-2core"
    assert machine_class("AMD EPYC 9R14", ["avx2", "avx512f", "avx512_bf16"], 2) == \
        "epyc-avx512bf16-2core"
    base = os.path.join(BASELINES, files[0])
    with open(base) as f:
        data = json.load(f)
    cpu = data["machine_info"]["cpu"]
    cpu["flags"] = [x for x in cpu["flags"] if x not in ("amx_bf16", "avx512_bf16")] + \
        ["avx2", "avx512f"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    lines = []
    assert not compare.compare(base, str(other), log=lines.append)
    assert files[0][:-5] in lines[-1] and "avx512-" in lines[-1], lines[-1]
    assert compare.compare(base, str(other), log=lambda *a: None, any_machine=True)
    p = subprocess.run([sys.executable, "-m", "alignkit.bench.compare", "--class"],
                       capture_output=True, text=True, cwd=REPO)
    from alignkit.bench.harness import this_machine_class
    assert p.returncode == 0 and p.stdout.strip() == this_machine_class()
    p = subprocess.run([sys.executable, "-m", "alignkit.bench.compare",
                        str(tmp_path / "none.json"), base], capture_output=True, text=True,
                       cwd=REPO)
    assert p.returncode == 1 and "make bench-baseline" in p.stdout


def test_alignkit_bench_cli_on_a_tiny_shape(tmp_path, monkeypatch):
    from alignkit.bench import cli
    out = tmp_path / "b.json"
    lines = []
    res = cli.run(["--hidden", "16", "--vocab", "64", "--tokens", "64", "--loss", "dpo",
                   "--dtype", "fp32", "--reps", "1", "--no-progress", "--json", str(out),
                   "--csv", str(tmp_path / "b.csv")], log=lines.append)
    names = [r.method for r in res["rows"]]
    assert names[0] == "GEMM floor (3 GEMMs)" and "alignkit preference_loss (auto)" in names
    assert "naive full logits" in names and "TRL ChunkedLogProbFunction" in names
    d = json.loads(out.read_text())
    assert d["shape"] == dict(S=2, T=32, H=16, V=64, loss="dpo", dtype="fp32")
    ak = next(r for r in d["rows"] if r["method"].startswith("alignkit"))
    assert ak["seconds"] > 0 and ak["peak_mib"] > 0 and ak["x_floor"] > 0
    # a peer that is not installed is listed, with the pip name that adds it
    real = methods.missing
    monkeypatch.setattr(methods, "missing", lambda m: m == "cut_cross_entropy" or real(m))
    res = cli.run(["--hidden", "16", "--vocab", "64", "--batch", "8", "--seq", "4", "--loss",
                   "grpo", "--dtype", "fp32", "--reps", "1", "--no-progress", "--no-memory"],
                  log=lines.append)
    cce = next(r for r in res["rows"] if r.method == "CCE torch_compile")
    assert cce.seconds is None and "pip install cut-cross-entropy" in cce.note
    assert "skipped: not installed: pip install cut-cross-entropy" in "\n".join(lines)


def test_alignkit_bench_reads_a_model_config_and_names_bad_input(tmp_path):
    conf = tmp_path / "config.json"
    conf.write_text(json.dumps({"hidden_size": 16, "vocab_size": 96,
                                "final_logit_softcapping": 30.0, "tie_word_embeddings": False}))
    from alignkit.bench import cli
    lines = []
    cli.run(["--model-config", str(conf), "--tokens", "32", "--loss", "logprobs", "--dtype",
             "fp32", "--reps", "1", "--no-progress", "--no-memory", "--no-peers"],
            log=lines.append)
    assert "H16 V96" in lines[0] and "softcap 30.0" in lines[0]
    env = dict(os.environ, PYTHONPATH=REPO)
    for args, msg in ((["--vocab", "64", "--tokens", "8"], "give --hidden and --vocab"),
                      (["--hidden", "8", "--vocab", "64", "--batch", "3", "--seq", "4"],
                       "--batch must be even for loss dpo"),
                      (["--model-config", "nope.json", "--tokens", "8"], "is not a file")):
        p = subprocess.run([sys.executable, "-m", "alignkit.cli", "bench", *args],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 2 and msg in p.stderr, p.stderr


def test_bench_losses_keep_mode_runs_each_budget(monkeypatch, kept_rows):
    """bench.losses --keep: each budget's step runs the single pass with the kept rows it
    names (none beyond the tile's own, the default, every deferred token); CCE is left to the
    bench run (its compile is slow)."""
    from bench.losses import keep_steps
    kept = kept_rows
    monkeypatch.setenv("ALIGNKIT_SINGLE_PASS_BYTES", str(16 * 500 * 4))     # 16-row tiles
    case = methods.make_case("tiny", 4, 64, 32, 500)
    steps = keep_steps(case, "dpo")
    assert "CCE torch_compile + loss" in steps
    counts = case.mask.sum(-1)                  # pairs (0, 2) and (1, 3); the longer is U
    deferred = int(counts.sum() - (counts[:2] + counts[2:]).max())
    for name, want in (("alignkit single_pass, keep_bytes=0", 16),
                       # (16 rows + 3/10 of grad_W less the two [16, H] temporaries) / 4V
                       ("alignkit single_pass, default keep",
                        (16 * 2000 + 19200 - 2 * 16 * 32 * 4) // 2000),
                       ("alignkit single_pass, keep every deferred token", deferred)):
        kept.clear()
        steps[name]()
        case.reset()
        assert kept == [min(want, deferred)], name


def test_grpo_step_bench_runs_both_trainers(tmp_path):
    """bench.grpo_step on a tiny shape: TRL's GRPOTrainer unpatched, then patched; it raises
    unless alignkit's op ran in the patched step only, and both steps log a loss."""
    import pytest
    pytest.importorskip("trl")
    from bench.grpo_step import run, table
    out = run(completion_length=8, generations=2, words=200, work=str(tmp_path),
              log=lambda *a: None)
    assert out["patched"][3] > 0 and set(out) == {"unpatched", "patched"}
    assert all(peak > 0 and loss == loss for peak, _, loss, _ in out.values())
    assert "MiB lower" in table(out, 8, 2, 204)


def test_a_failing_method_is_one_table_row():
    # a peer that raises (Liger's compiled loss failed in dynamo with a multi-line message) is
    # reported in its row's note, on one line, so the markdown table stays whole
    from alignkit.bench import harness

    def bad():
        raise AssertionError("sources must not be empty for symbol s37\n  more detail\n")
    steps = {harness.FLOOR: lambda: None, "peer": bad, "ok": lambda: None}
    _, rows = harness.measure("tiny", steps, reset=lambda: None, reps=1, grads_mib=1.0,
                              skip_memory=True, log=lambda *a: None)
    table = harness.markdown(rows).splitlines()
    assert len(table) == 2 + 3
    peer = next(line for line in table if "| peer |" in line)
    assert "failed: AssertionError: sources must not be empty for symbol s37 more detail" in peer
    assert all(line.startswith("|") and line.endswith("|") for line in table)


def test_a_profile_step_past_the_run_opens_no_window():
    """bench.trainer's StepClock with a profile step past the run's last step (the benches' way
    of asking for no peak) opens no profiler session: one opened after the last step and never
    closed crashed `bench.long_sequences real` at exit (SIGSEGV in ~ProfilerStateBase)."""
    from bench.trainer import StepClock
    opened = []
    for profile_step, steps in ((4, 3), (3, 3)):
        clock = StepClock(profile_step, steps)
        clock.window.start = lambda opened=opened, p=profile_step: opened.append(p)
        clock.window.stop = lambda: 0
        clock.resident = 0
        for step in range(1, steps + 1):
            clock.on_end(step)
        assert len(clock.ends) == steps
    assert opened == [3]                # only the run whose profile step is one of its steps


def test_prefix_attention_bench_runs_three_ways_on_the_same_math(monkeypatch):
    """bench.prefix_attention on a tiny length: its three ways (merge, mask, prompt again) give
    the same attention, the merge way through alignkit's prefix_causal, and each step runs."""
    import torch
    import bench.prefix_attention as bp
    calls = []
    real = bp.prefix_causal
    monkeypatch.setattr(bp, "prefix_causal", lambda *a: calls.append(1) or real(*a))
    fns, _, _ = bp.ways(7, 5)
    with torch.no_grad():
        outs = {k: fn() for k, fn in fns.items()}
    assert calls == [1] and outs["merge"].shape == (1, bp.HEADS, 5, bp.D)
    torch.testing.assert_close(outs["mask"], outs["merge"], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs["prompt again"], outs["merge"], rtol=0, atol=1e-5)
    steps, reset = bp.steps_for(7, 5)
    for step in steps.values():
        reset()
        step()


def test_paper_costs_the_single_pass_with_the_codes_rows():
    # bench.paper's single pass takes its tile rows and kept rows from single_pass (CUDA, bf16,
    # triton), so the model cannot drift from what VocabTiles allocates: at H=4096, V=128256 the
    # 1 GiB budget is 1395 rows of fp32 tile + bf16 G, and the kept rows reuse G's buffer
    import pytest
    import torch
    pytest.importorskip("triton")
    from bench import paper
    from alignkit.ops.pass_budget import keep_rows
    H, V = paper.SHAPES["Llama-3-8B"]
    kept = keep_rows(V, H, "cuda", torch.bfloat16, backend="triton")
    _, chunks, R, gemms = paper.single_pass(H, V, 0.5)
    assert R == 1395 and chunks == 6
    assert gemms == 3 + (paper.N // 2 - kept) / paper.N and kept > paper.N // 2 - 320


def test_option_costs_bench_runs_each_option(monkeypatch):
    """bench.option_costs times WPO and the entropy quantile beside their plain losses: each row
    ran, and the WPO row's extra forward GEMM (vocab_row_stats) ran in it."""
    import alignkit.ops.vocab_stats as vs
    from bench.option_costs import run
    calls = []
    real = vs.vocab_row_stats
    monkeypatch.setattr(vs, "vocab_row_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = run(2, 16, 16, 64, reps=1, log=lambda *a: None)
    assert {r.method for r in rows if r.seconds is not None} >= {
        "dpo", "dpo, use_weighting (WPO)", "dapo", "dapo, top_entropy_quantile=0.2"}
    assert calls


def test_alignkit_bench_sft_on_a_tiny_shape():
    # --loss sft: alignkit's rows (plain; smoothing + z-loss) beside the floor and the peers
    from alignkit.bench import cli
    lines = []
    res = cli.run(["--hidden", "16", "--vocab", "64", "--tokens", "64", "--loss", "sft",
                   "--dtype", "fp32", "--reps", "1", "--no-progress", "--no-memory"],
                  log=lines.append)
    by = {r.method: r for r in res["rows"]}
    for name in ("GEMM floor (3 GEMMs)", "alignkit sft_loss",
                 "alignkit sft_loss (label_smoothing=0.1, z_loss=1e-4)", "naive full logits",
                 "TRL ChunkedLogProbFunction", "CCE torch_compile"):
        assert by[name].seconds and by[name].seconds > 0, (name, by[name].note)
    import torch.nn.functional as F
    if hasattr(F, "linear_cross_entropy"):
        assert by["torch F.linear_cross_entropy chunked"].seconds > 0
    assert "Liger fused (eager)" in by and by["Liger fused (eager)"].seconds is None  # CPU


def test_plan_gap_bench_pairs_auto_with_every_plan_it_could_take(monkeypatch, capsys, tmp_path):
    """bench.plan_gap: auto decides afresh (tuning calls timed), then its plan is paired with
    every other feasible plan and with itself pinned; every pinned plan ran."""
    import bench.plan_gap as pg
    from alignkit.ops import plan
    monkeypatch.setattr(pg, "SHAPES", {"A": ("A 2x24 H16 V300", 2, 24, 16, 300, ["dpo"]),
                                       "R2": ("R2 2x24 H16 V300", 2, 24, 16, 300, ["gspo"])})
    monkeypatch.setattr(pg, "DEFAULT", ["A", "R2"])
    monkeypatch.setenv("ALIGNKIT_AUTOTUNE", "1")
    monkeypatch.setenv("ALIGNKIT_PLAN_CACHE", str(tmp_path))    # main points it at its own
    ran = []
    real_ran, real_note = plan._ran, plan.note
    monkeypatch.setattr(plan, "_ran", lambda c, *a: ran.append(c.plan) or real_ran(c, *a))
    # a pinned recompute is fixed by the front door, which notes it (plan.note)
    monkeypatch.setattr(plan, "note", lambda n, why: ran.append(n) or real_note(n, why))
    import alignkit.losses.fused as fused
    import alignkit.losses.policy as policy
    for m in (fused, policy):
        monkeypatch.setattr(m, "note", plan.note, raising=False)
    pg.main(["--quads", "1", "--dtypes", "fp32"])
    out = capsys.readouterr().out
    assert "| A | dpo | fp32 | " in out and "| R2 | gspo | fp32 | " in out
    assert {"recompute", "single_pass"} <= set(ran)
