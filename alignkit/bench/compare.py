"""The regression gate: ``python -m alignkit.bench.compare BASELINE.json NEW.json [--max 0.10]``.

Both files are pytest-benchmark JSON (``pytest bench --benchmark-only --benchmark-json F``). For
every alignkit case of the baseline, the new run's ratio to the GEMM floor (extra_info.x_floor)
may exceed the baseline's by at most ``--max`` (10%); a ratio, not a time, so that a slower or
faster machine of the same class moves the floor and alignkit together. A case that the new run
lacks fails too. Exit status 1 on any failure, with a table of every case.
"""
from __future__ import annotations

import argparse
import json
import sys


def ratios(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("alignkit") and "x_floor" in info:
            out[f"{info['shape']} {info['loss']}: {info['method']}"] = info["x_floor"]
    return out


def compare(baseline: str, new: str, max_regression: float = 0.10, log=print) -> bool:
    base, cur = ratios(baseline), ratios(new)
    if not base:
        raise ValueError(f"{baseline}: no alignkit case with an x_floor (not a suite JSON?)")
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
    p.add_argument("baseline")
    p.add_argument("new")
    p.add_argument("--max", type=float, default=0.10, help="largest allowed regression")
    a = p.parse_args(argv)
    return 0 if compare(a.baseline, a.new, a.max) else 1


if __name__ == "__main__":
    sys.exit(main())
