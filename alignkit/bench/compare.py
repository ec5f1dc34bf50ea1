"""The regression gate: ``python -m alignkit.bench.compare BASELINE.json NEW.json [--max 0.10]``.

Both files are pytest-benchmark JSON (``pytest bench --benchmark-only --benchmark-json F``). For
every alignkit case of the baseline, the new run's ratio to the GEMM floor (extra_info.x_floor)
may exceed the baseline's by at most ``--max`` (10%); a ratio, not a time, so that a slower or
faster machine of the same class moves the floor and alignkit together. A case that the new run
lacks fails too. Exit status 1 on any failure, with a table of every case.

Machines of different classes (harness.machine_class: the CPU family, its matrix units, the
core count) are not compared: the gate refuses, naming both classes, unless ``--any-machine``.
Baselines live in bench/baselines/<class>.json; ``python -m alignkit.bench.compare --class``
prints this machine's class (the Makefile's bench-compare picks the baseline by it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from alignkit.bench.harness import machine_class, this_machine_class


def ratios(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("alignkit") and "x_floor" in info:
            out[f"{info['shape']} {info['loss']}: {info['method']}"] = info["x_floor"]
    return out


def file_class(path: str):
    """The machine class of a suite JSON, from pytest-benchmark's machine_info (None if absent)."""
    with open(path) as f:
        cpu = json.load(f).get("machine_info", {}).get("cpu")
    if not isinstance(cpu, dict):
        return None
    return machine_class(cpu.get("brand_raw", ""), cpu.get("flags", []), cpu.get("count", 1))


def compare(baseline: str, new: str, max_regression: float = 0.10, log=print,
            any_machine: bool = False) -> bool:
    base, cur = ratios(baseline), ratios(new)
    if not base:
        raise ValueError(f"{baseline}: no alignkit case with an x_floor (not a suite JSON?)")
    cb, cn = file_class(baseline), file_class(new)
    if not any_machine and cb != cn:
        log(f"FAILED: {baseline} is from machine class {cb} and {new} from {cn}; ratios to the "
            f"floor differ between classes. Write a baseline on this class (make bench-baseline) "
            f"or pass --any-machine")
        return False
    ok = True
    log("| case | baseline x floor | new x floor | change | |\n|---|---|---|---|---|")
    for k, b in sorted(base.items()):
        if k not in cur:
            log(f"| {k} | {b:.3f} | missing | | FAIL |")
            ok = False
            continue
        change = cur[k] / b - 1
        bad = change > max_regression
        ok &= not bad
        log(f"| {k} | {b:.3f} | {cur[k]:.3f} | {change:+.1%} | {'FAIL' if bad else 'ok'} |")
    log(("passed" if ok else "FAILED") + f": no alignkit case may be more than "
        f"{max_regression:.0%} slower against the floor than {baseline}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", nargs="?")
    p.add_argument("new", nargs="?")
    p.add_argument("--max", type=float, default=0.10, help="largest allowed regression")
    p.add_argument("--any-machine", action="store_true",
                   help="compare across machine classes")
    p.add_argument("--class", dest="show_class", action="store_true",
                   help="print this machine's class (the baseline's file name) and exit")
    a = p.parse_args(argv)
    if a.show_class:
        print(this_machine_class())
        return 0
    if not (a.baseline and a.new):
        p.error("give BASELINE.json NEW.json (or --class)")
    if not os.path.exists(a.baseline):
        print(f"no baseline {a.baseline} for this machine class ({this_machine_class()}): write "
              "one with `make bench-baseline` (the whole suite, ~12 min)")
        return 1
    return 0 if compare(a.baseline, a.new, a.max, any_machine=a.any_machine) else 1


if __name__ == "__main__":
    sys.exit(main())
