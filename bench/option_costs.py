"""What the options that need a second look at the vocabulary cost against the GEMM floor
(issue #35): DPO's WPO weighting (log Σ p² per labelled token: one extra forward GEMM, no grad)
and the policy loss's top_entropy_quantile (every token's entropy before G is formed: a coupled
token pass, 3 GEMMs within the keep budget, 4 past it), each beside the same loss without it.

    python -m bench.option_costs [--shape S T H V] [--reps 5] [--write]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from alignkit.bench import harness, methods

OUT = Path(__file__).parent


def run(S, T, H, V, reps, log=print):
    case = methods.make_case(f"{S}x{T} H{H} V{V}", S, T, H, V)
    steps = {harness.FLOOR: methods.floor(case),
             "dpo": methods.alignkit_fused("dpo", name="dpo")(case),
             "dpo, use_weighting (WPO)": _wpo(case),
             "dapo": methods.alignkit_policy(dict(loss_type="dapo"), name="dapo")(case),
             "dapo, top_entropy_quantile=0.2": methods.alignkit_policy(
                 dict(loss_type="dapo", top_entropy_quantile=0.2), name="quantile")(case)}
    return harness.measure(case.name, steps, reset=case.reset, reps=reps,
                           grads_mib=case.grads_mib, skip_memory=False, log=log)[1]


def _wpo(case):
    import alignkit
    return methods.settled("wpo", lambda: alignkit.preference_loss(
        case.h, case.W, case.y, loss="dpo", ref_logprobs=case.ref,
        use_weighting=True)[0].backward())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=4, type=int, default=[4, 512, 512, 32000],
                   metavar=("S", "T", "H", "V"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    t0 = time.time()
    rows = run(*a.shape, a.reps)
    table = harness.markdown(rows, shape_column=False)
    print(f"\nmachine: {harness.machine()}\n{table}")
    if a.write:
        out = OUT / "out"
        out.mkdir(exist_ok=True)
        (out / "option_costs.md").write_text(
            f"## Options with a second look at the vocabulary\n\nMachine: {harness.machine()}. "
            f"Command: `python -m bench.option_costs {' '.join(sys.argv[1:] if argv is None else argv)}`"
            f" ({time.time() - t0:.0f} s).\n\n{table}\n")
        harness.write_rows("option_costs", "python -m bench.option_costs " +
                           " ".join(sys.argv[1:] if argv is None else argv), table)


if __name__ == "__main__":
    main()
