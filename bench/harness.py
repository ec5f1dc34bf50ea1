"""Timing and exact peak-memory measurement shared by the bench scripts.

Time: median of `reps` interleaved rounds after `warmup` runs, each a full fwd+bwd (or forward)
from fresh grads.
Memory: the exact peak of live tensor memory allocated during one run, from the profiler's
allocation events (`[memory]` events summed in time order, running maximum). Tensors that exist
before the run (inputs, weights) are not counted; gradients and everything the method allocates are.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

from alignkit.profiling import peak_memory_bytes


peak_bytes = peak_memory_bytes


def timed_run(fn, reset=None) -> float:
    """Seconds of one run of fn, from fresh grads (reset) and a collected heap, both untimed."""
    if reset:
        reset()
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, warmup: int = 1, reps: int = 3, reset=None) -> float:
    return interleaved_times({"x": fn}, warmup, reps, reset)[0]["x"]


def interleaved_times(steps: dict, warmup: int = 1, reps: int = 3, reset=None,
                      slow_after: float | None = None) -> dict:
    """Median time of each step, measured in `reps` interleaved rounds (one run of every step per
    round) after `warmup` runs each. This machine's speed drifts by up to ~30% over minutes;
    interleaving makes every method see the same drift, so ratios within one run stay honest.

    A step whose last warm-up run took longer than `slow_after` seconds is timed once only (a peer
    at 40x the floor would otherwise take most of the bench's time); those are returned as `slow`.
    Returns (median seconds per step, slow)."""
    slow = set()
    for k, fn in steps.items():
        for _ in range(warmup):
            if timed_run(fn, reset) > (slow_after or float("inf")):
                slow.add(k)
    times = {k: [] for k in steps}
    for r in range(reps):
        for k, fn in steps.items():
            if k in slow and r > 0:
                continue
            times[k].append(timed_run(fn, reset))
    return {k: statistics.median(v) for k, v in times.items()}, slow


def paired_ratios(steps: dict, base: str, warmup: int = 1, reps: int = 5, reset=None):
    """Each step's time over the `base` step's, the base run right before it in every round:
    median of the per-pair ratios, plus the median seconds of each step. Two runs seconds
    apart see the same machine speed, so the ratio loses most of the drift that a ratio of
    two medians keeps (up to ~30% here). Returns (ratios, seconds)."""
    for fn in steps.values():
        for _ in range(warmup):
            timed_run(fn, reset)
    ratios = {k: [] for k in steps if k != base}
    secs = {k: [] for k in steps}
    for _ in range(reps):
        for k in ratios:
            b = timed_run(steps[base], reset)
            t = timed_run(steps[k], reset)
            secs[base].append(b)
            secs[k].append(t)
            ratios[k].append(t / b)
    return ({k: statistics.median(v) for k, v in ratios.items()},
            {k: statistics.median(v) for k, v in secs.items()})


def peak_after_reset(fn, reset=None) -> int:
    if reset:
        reset()
    return peak_bytes(fn)


FLOOR = "GEMM floor (3 GEMMs)"


def measure(label: str, steps: dict, *, reset, reps: int, grads_mib: float, skip_memory: bool,
            unlisted=(), log=print, paired: bool = False):
    """Runs each step once (a step that fails is reported as a row, not hidden), times the rest in
    interleaved rounds (steps[FLOOR] sets the cut-off for peers too slow to time `reps` times),
    profiles their peak memory, and returns (times, rows). Steps named in `unlisted` are timed but
    get no row: the caller reports them against another baseline. paired: each step's ratio to
    the floor is the median of `reps` (floor, step) back-to-back pairs (paired_ratios) instead of
    a ratio of medians."""
    notes = {}
    for k in list(steps):
        try:
            reset()
            steps[k]()
        except Exception as exc:
            notes[k] = f"failed: {type(exc).__name__}: {exc}"[:120]
            log(f"  {k:40s} FAILED {notes[k]}")
            del steps[k]
    log(f"[{label}] timing {len(steps)} steps x {reps} "
        f"{'(floor, step) pairs' if paired else 'interleaved rounds'}")
    ratio = {}
    if paired:
        ratio, t = paired_ratios(steps, FLOOR, warmup=1, reps=reps, reset=reset)
        slow = set()
    else:
        floor0 = median_time(steps[FLOOR], reps=1)
        t, slow = interleaved_times(steps, warmup=1, reps=reps, reset=reset, slow_after=8 * floor0)
    floor_s = t[FLOOR]
    rows = []
    for k in steps:
        if k in unlisted:
            continue
        mem = None
        if not skip_memory and k != FLOOR:
            mem = peak_after_reset(steps[k], reset) / 2**20
        note = "timed once (> 8x floor)" if k in slow else ""
        if k in ratio:
            note = f"median of {reps} (floor, step) pairs"
        rows.append(Row(label, k, t[k], mem, floor_s, grads_mib, note=note,
                        ratio=ratio.get(k)))
        log(f"  {k:40s} {t[k]:7.3f}s  {rows[-1].x_floor:5.2f}x floor  {fmt(mem, '7.0f')} MiB")
    rows += [Row(label, k, None, None, floor_s, grads_mib, note=n) for k, n in notes.items()]
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


def markdown(rows: list[Row]) -> str:
    out = ["| shape | method | time (s) | time / floor | peak MiB | peak / (grad_W+grad_h) | note |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.shape} | {r.method} | {fmt(r.seconds, '.3f')} | {fmt(r.x_floor, '.2f', 'x')} "
                   f"| {fmt(r.peak_mib, '.0f')} | {fmt(r.x_grads, '.2f', 'x')} | {r.note} |")
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


def machine() -> str:
    import os
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
