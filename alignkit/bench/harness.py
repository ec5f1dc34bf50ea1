"""Timing and exact peak-memory measurement shared by every bench (``measure`` is the loop).

Time: median of `reps` interleaved rounds after a first (warm-up) run, each a full fwd+bwd (or
forward) from fresh grads.
Memory: the exact peak of live tensor memory allocated during one run, from the profiler's
allocation events (`[memory]` events summed in time order, running maximum). Tensors that exist
before the run (inputs, weights) are not counted; gradients and everything the method allocates are.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from alignkit.bench.profiling import peak_memory_bytes


peak_bytes = peak_memory_bytes


def timed_run(fn, reset=None) -> float:
    """Seconds of one run of fn, from fresh grads (reset) and a collected heap, both untimed."""
    if reset:
        reset()
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(steps: dict, warmup: int = 1, reps: int = 3, reset=None,
                      progress=None) -> dict:
    """Median time of each step, measured in `reps` interleaved rounds (one run of every step per
    round) after `warmup` runs each. This machine's speed drifts by up to ~30% over minutes;
    interleaving makes every method see the same drift, so ratios within one run stay honest.
    progress: called with the step's name after every run (a progress bar). (Peers too slow to
    time `reps` times are kept out by the caller: measure.)"""
    tick = progress or (lambda k: None)
    for k, fn in steps.items():
        for _ in range(warmup):
            timed_run(fn, reset)
            tick(k)
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            times[k].append(timed_run(fn, reset))
            tick(k)
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratios(steps: dict, base: str, warmup: int = 1, reps: int = 5, reset=None):
    """Each step's time over the `base` step's from `reps` back-to-back quads (base, step, step,
    base): each quad's ratio sqrt(t_s1·t_s2 / (t_b1·t_b2)), the median over the quads, plus the
    median seconds of each step. Runs seconds apart see the same machine speed, so the ratio
    loses most of the drift that a ratio of two medians keeps (up to ~30% here); a quad holds
    both orders, so the few percent by which the second run of a pair differs from the first
    cancel too. Returns (ratios, seconds)."""
    for fn in steps.values():
        for _ in range(warmup):
            timed_run(fn, reset)
    ratios = {k: [] for k in steps if k != base}
    secs = {k: [] for k in steps}
    for _ in range(reps):
        for k in ratios:
            b1 = timed_run(steps[base], reset)
            t1 = timed_run(steps[k], reset)
            t2 = timed_run(steps[k], reset)
            b2 = timed_run(steps[base], reset)
            secs[base] += [b1, b2]
            secs[k] += [t1, t2]
            ratios[k].append(math.sqrt(t1 * t2 / (b1 * b2)))
    return ({k: statistics.median(v) for k, v in ratios.items()},
            {k: statistics.median(v) for k, v in secs.items()})


FLOOR = "GEMM floor (3 GEMMs)"


def measure(label: str, steps: dict, *, reset, reps: int, grads_mib: float, skip_memory: bool,
            unlisted=(), log=print, paired: bool = False, budget_s: float | None = None,
            progress=None, skipped: dict | None = None, floor: str = FLOOR):
    """The one measuring loop of every bench (bench.core / losses / rl, the pytest-benchmark
    suite, ``alignkit bench``). Returns (median seconds per step, rows).

    1. A first run of each step, from fresh grads: under the profiler (its exact peak memory)
       unless skip_memory. It is the warm-up (compiles, first allocations) and the check that the
       step runs (a step that fails becomes a row with the error, not hidden).
    2. One warm, timed run of each: the cut-off (a step over 8x the floor's warm run keeps that
       time, as a peer at 30x the floor would otherwise take most of the bench's time; the note
       says so) and, with budget_s, the estimate of a round.
    3. `reps` interleaved rounds (one run of every step a round), so that the machine's drift
       hits every method alike; with budget_s, fewer rounds (at least one) when the warm runs
       say that `reps` would not fit in it. paired: each step's ratio to the floor is instead
       the median of `reps` back-to-back (floor, step, step, floor) quads (paired_ratios).
    Steps named in `unlisted` are timed but get no row (the caller reports them against another
    baseline); `skipped` {name: why} become rows with the reason (a peer not installed).
    floor: the step every ratio is to (FLOOR; bench.distill's 4-GEMM floor)."""
    notes, mem = {}, {}
    tick = progress or (lambda k: None)
    for k in list(steps):
        try:
            reset()
            if skip_memory or k == floor:
                steps[k]()
            else:
                mem[k] = peak_bytes(steps[k]) / 2**20
        except Exception as exc:
            # one line: the note is a markdown table cell (a multi-line message broke the table)
            notes[k] = " ".join(f"failed: {type(exc).__name__}: {exc}".split())[:120]
            log(f"  {k:40s} FAILED {notes[k]}")
            del steps[k]
        tick(k)
    warm = {}
    for k, fn in steps.items():
        warm[k] = timed_run(fn, reset)
        tick(k)
    slow = {k for k in steps if warm[k] > 8 * warm[floor]}
    if budget_s is not None and not paired:
        per_round = sum(warm[k] for k in steps if k not in slow)
        reps = max(1, min(reps, int(budget_s / max(per_round, 1e-9))))
    log(f"[{label}] timing {len(steps)} steps x {reps} "
        f"{'(floor, step, step, floor) quads' if paired else 'interleaved rounds'}")
    ratio = {}
    if paired:
        ratio, t = paired_ratios(steps, floor, warmup=0, reps=reps, reset=reset)
    else:
        fast = {k: v for k, v in steps.items() if k not in slow}
        t = interleaved_times(fast, warmup=0, reps=reps, reset=reset, progress=tick)
        t.update({k: warm[k] for k in slow})
    floor_s = t[floor]
    rows = []
    for k in steps:
        if k in unlisted:
            continue
        note = "one warm run (> 8x floor)" if k in slow else ""
        if k in ratio:
            note = f"median of {reps} (floor, step, step, floor) quads"
        rows.append(Row(label, k, t[k], mem.get(k), floor_s, grads_mib, note=note,
                        ratio=ratio.get(k)))
        log(f"  {k:40s} {t[k]:7.3f}s  {rows[-1].x_floor:5.2f}x floor  "
            f"{fmt(mem.get(k), '7.0f')} MiB")
    rows += [Row(label, k, None, None, floor_s, grads_mib, note=n) for k, n in notes.items()]
    rows += [Row(label, k, None, None, floor_s, grads_mib, note=f"skipped: {n}")
             for k, n in (skipped or {}).items()]
    return t, rows


@dataclass
class Row:
    shape: str
    method: str
    seconds: float | None
    peak_mib: float | None
    floor_s: float
    grads_mib: float
    note: str = ""
    extra: dict = field(default_factory=dict)
    ratio: float | None = None          # measured paired ratio to the floor, where there is one

    @property
    def x_floor(self):
        if self.ratio is not None:
            return self.ratio
        return None if self.seconds is None else self.seconds / self.floor_s

    @property
    def x_grads(self):
        return None if self.peak_mib is None else self.peak_mib / self.grads_mib


def fmt(v, spec, unit=""):
    return "n/a" if v is None else format(v, spec) + unit


def markdown(rows: list[Row], shape_column: bool = True) -> str:
    """The benches' table; shape_column=False for one shape (alignkit bench)."""
    head = ["method", "time (s)", "time / floor", "peak MiB", "peak / (grad_W+grad_h)", "note"]
    if shape_column:
        head.insert(0, "shape")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, fmt(r.seconds, ".3f"), fmt(r.x_floor, ".2f", "x"),
                 fmt(r.peak_mib, ".0f"), fmt(r.x_grads, ".2f", "x"), r.note]
        out.append("| " + " | ".join(([r.shape] if shape_column else []) + cells) + " |")
    return "\n".join(out)


def write_csv(rows: list[Row], path):
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["shape", "method", "seconds", "x_floor", "peak_mib", "x_grads", "floor_s",
                    "grads_mib", "note"])
        for r in rows:
            w.writerow([r.shape, r.method, r.seconds, r.x_floor, r.peak_mib, r.x_grads, r.floor_s,
                        r.grads_mib, r.note])


def plot(rows: list[Row], path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r.shape for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows if r.seconds is not None))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(methods), 1)
    for k, (ax, attr, label) in enumerate(zip(axes, ("x_floor", "x_grads"),
                                              ("time / GEMM floor", "peak / (grad_W + grad_h)"))):
        for i, m in enumerate(methods):
            vals = []
            for s in shapes:
                r = next((r for r in rows if r.shape == s and r.method == m), None)
                v = getattr(r, attr) if r else None
                vals.append(v if v is not None else 0.0)
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_out(name: str, module: str, text: str) -> str:
    """bench/out/<name>.md: the command line (``python -m <module> <argv>``), then the text; and
    its tables as rows (write_rows). Returns the path."""
    import sys
    os.makedirs("bench/out", exist_ok=True)
    path = os.path.join("bench/out", f"{name}.md")
    command = f"python -m {module} {' '.join(sys.argv[1:])}".strip()
    with open(path, "w") as f:
        f.write(f"command: {command}\n\n{text}\n")
    write_rows(name, command, text)
    return path


def markdown_tables(text: str) -> list:
    """[{"header": [...], "rows": [[...], ...]}] of the Markdown tables in a bench's text."""
    tables, cur = [], None
    for line in text.split("\n"):
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cur is None:
                cur = {"header": cells, "rows": []}
                tables.append(cur)
            elif not all(set(c) <= set("-: ") for c in cells):
                cur["rows"].append(cells)
        else:
            cur = None
    return tables


def write_rows(name: str, command: str, text: str, root: str = "bench/out/rows") -> str:
    """The machine-readable record of one bench run, which bench/render_results.py turns into
    bench/RESULTS.md: ``<root>/<machine class>/<name>.json`` with the command, the date, the
    machine and the text's tables as rows. A later run of the same bench on the same class
    replaces it (git keeps the history). Returns the path."""
    import datetime
    import json
    cls = this_machine_class()
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    path = os.path.join(root, cls, f"{name}.json")
    doc = {"bench": name, "command": command, "date": datetime.date.today().isoformat(),
           "machine": machine(), "machine_class": cls, "tables": markdown_tables(text)}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return path


def emit(lines, write: bool, name: str, module: str) -> str:
    """A bench's table: printed, and with ``write`` saved as bench/out/<name>.md (write_out).
    Returns the text."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_out(name, module, text)
    return text


def _cpu_model() -> str:
    """/proc/cpuinfo's model name (platform's processor or machine where there is none)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return (f"{_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def machine_class(brand: str, flags, cores: int) -> str:
    """The class a benchmark baseline belongs to: '<family>-<isa>-<cores>core', e.g.
    xeon-amx-2core (this project's Intel Xeon with AMX) or epyc-avx2-2core (an AMD EPYC with
    AVX2 only). Ratios to the GEMM floor move with the matrix units: with AMX or avx512_bf16 a
    bf16 GEMM is 3.5-4x an fp32 one, without them ~20x slower, and the elementwise share of a
    step grows with the GEMM rate, so a baseline holds only for its class."""
    flags = set(flags)
    b = brand.lower()
    family = next((f for f in ("xeon", "epyc", "core", "ryzen") if f in b), None) or \
        (b.split()[0].strip("(r)") if b.strip() else "cpu")
    isa = ("amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags else
           "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else
           "neon" if ("asimd" in flags or "neon" in flags) else "base")
    return f"{family}-{isa}-{cores}core"


def this_machine_class() -> str:
    """machine_class of the machine this runs on (its model name, the flags that the backends'
    dispatch reads, os.cpu_count())."""
    from alignkit.ops.backends import cpu_flags
    return machine_class(_cpu_model(), cpu_flags(), os.cpu_count() or 1)
