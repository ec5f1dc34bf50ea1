"""Core-op benchmark: per-token log-probs from hidden states, fwd+bwd of a sequence-level loss.

    python -m bench.core --preset small            # quick table (the README's main command)
    python -m bench.core --preset full --write     # B1-B3, writes bench/out/ (rows, CSV) and a PNG

Each method runs on the same inputs in one process: time (median after warm-up) and the exact peak
of live tensor memory (profiler allocation events). Ratios are to the GEMM floor (the three GEMMs
over the labelled tokens, timed in the same run) and to grad_W + grad_h.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from alignkit.bench import harness, methods

PRESETS = {
    # 25% of each row is a masked prompt (labels -100)
    "small": [("S1 2x256 H256 V8000", 2, 256, 256, 8000)],
    "full": [
        ("B1 4x1024 H1024 V32000", 4, 1024, 1024, 32000),
        ("B2 2x512 H384 V151936", 2, 512, 384, 151936),
        ("B3 1x8192 H256 V32000", 1, 8192, 256, 32000),
    ],
}
OUT = Path(__file__).parent


def run(preset: str, only: list[str] | None, reps: int, skip_memory: bool, log=print):
    rows: list[harness.Row] = []
    for name, S, T, H, V in PRESETS[preset]:
        case = methods.make_case(name, S, T, H, V)
        steps = {harness.FLOOR: methods.floor(case), "one GEMM": methods.one_gemm(case),
                 "alignkit no-grad forward": methods.alignkit_nograd(case)}
        for mname, setup in methods.METHODS.items():
            if only and not any(o.lower() in mname.lower() for o in only):
                continue
            step = setup(case)
            if step is None:
                log(f"  {mname:40s} n/a (needs pairs)")
                continue
            steps[mname] = step
        log(f"[{name}] labelled tokens {int(case.mask.sum())}")
        t, shape_rows = harness.measure(name, steps, reset=case.reset, reps=reps,
                                        grads_mib=case.grads_mib, skip_memory=skip_memory,
                                        unlisted=("one GEMM", "alignkit no-grad forward"), log=log)
        rows += shape_rows
        ng, gemm_s = t["alignkit no-grad forward"], t["one GEMM"]
        rows.append(harness.Row(name, "alignkit no-grad forward", ng, None, gemm_s, case.grads_mib,
                                note="time / floor is vs ONE GEMM"))
        log(f"  {'alignkit no-grad forward':40s} {ng:7.3f}s  {ng / gemm_s:5.2f}x one GEMM")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--only", nargs="*", help="substrings of method names to run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--write", action="store_true", help="write bench/out/ (rows, CSV) and a PNG")
    a = p.parse_args(argv)
    t0 = time.time()
    rows = run(a.preset, a.only, a.reps, a.skip_memory)
    table = harness.markdown(rows)
    print()
    print(f"machine: {harness.machine()}")
    print(table)
    if a.write:
        out = OUT / "out"
        out.mkdir(exist_ok=True)
        harness.write_csv(rows, out / f"core_{a.preset}.csv")
        harness.plot(rows, OUT / f"core_{a.preset}.png", "alignkit core op, fwd+bwd (CPU)")
        section = (f"## Core op, preset `{a.preset}`\n\nMachine: {harness.machine()}. Command: "
                   f"`python -m bench.core {' '.join(sys.argv[1:] if argv is None else argv)}` "
                   f"({time.time() - t0:.0f} s).\n\n{table}\n")
        (out / f"core_{a.preset}.md").write_text(section)
        harness.write_rows(f"core_{a.preset}", "python -m bench.core " +
                           " ".join(sys.argv[1:] if argv is None else argv), table)
        print(f"\nwrote {out}/core_{a.preset}.{{csv,md}} and bench/core_{a.preset}.png")


if __name__ == "__main__":
    main()
