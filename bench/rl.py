"""RL policy losses from hidden states (issue #15): one fwd+bwd of a policy loss, alignkit's
policy_loss against naive full logits, TRL
1.16's ChunkedLogProbFunction log-probs, Liger's LigerFusedLinearGRPOLoss (eager and compiled),
and the 3-GEMM floor. alignkit's rows: auto (and auto at memory="fast") beside every plan of the
chooser, pinned (alignkit/ops/plan.py): recompute, single_pass, single_pass_fast. The naive and TRL rows run the same loss math on their log-probs
(alignkit.losses.policy.policy_terms), so only the head differs.

    python -m bench.rl [--preset small|full] [--reps 3] [--runs gspo ...] [--shapes R1 ...]
                       [--no-peers] [--write]

--no-peers: the floor and alignkit's rows only (R1's peers take most of its ~45 minutes a run).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from alignkit.bench import harness, methods

OUT = Path(__file__).parent
SMALL = [("R2 16x256 H512 V32000", 16, 256, 512, 32000),
         ("R3 2x8192 H256 V32000", 2, 8192, 256, 32000)]
PRESETS = {"small": SMALL, "full": [("R1 8x512 H1024 V151936", 8, 512, 1024, 151936)] + SMALL}
RUNS = [("dapo", dict(loss_type="dapo")),
        ("grpo beta=0.04", dict(loss_type="grpo", beta=0.04)),
        ("dapo + entropy bonus", dict(loss_type="dapo", entropy_coef=0.01)),
        # sequence-level importance sampling (GSPO): every token deferred to its sequence's end
        ("gspo", dict(loss_type="grpo", importance_sampling_level="sequence"))]


alignkit_policy, liger = methods.alignkit_policy, methods.liger_grpo


# (shape, auto's plan, ...) of each plan measurement this process ran (methods.auto_against_plans)
SUMMARY: list = []


def run(preset, reps, skip_memory, log=print, runs=None, shapes=None, peers=True):
    rows = []
    for name, S, T, H, V in PRESETS[preset]:
        if shapes and not any(x in name for x in shapes):
            continue
        case = methods.make_case(name, S, T, H, V)
        for label, kw in RUNS:
            if runs and label not in runs:
                continue
            # auto beside every plan of the chooser (pinned)
            steps = {harness.FLOOR: methods.floor(case),
                     **methods.plan_steps(case, policy_kw=kw)}
            if peers:
                steps["naive full logits + loss"] = methods.peer_step(
                    "naive full logits", kw["loss_type"], kw)(case)
                steps["TRL chunked log-probs + loss"] = methods.peer_step(
                    "TRL ChunkedLogProbFunction", kw["loss_type"], kw)(case)
            for compiled in ((False, True) if peers else ()):
                try:
                    steps[f"Liger GRPO ({'compiled' if compiled else 'eager'})"] = \
                        liger(kw, compiled)(case)
                except NotImplementedError as e:
                    log(f"  Liger: {e}")
            got = harness.measure(f"{name} {label}", steps, reset=case.reset, reps=reps,
                                  grads_mib=case.grads_mib, skip_memory=skip_memory, log=log)[1]
            rows += got
            SUMMARY.extend(methods.auto_against_plans(got))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--runs", nargs="*", choices=[r[0] for r in RUNS],
                   help="the losses to run (default: all)")
    p.add_argument("--shapes", nargs="*", help="substrings of shape names to run (default: all)")
    p.add_argument("--no-peers", action="store_true",
                   help="the floor and alignkit only (no naive, TRL or Liger rows)")
    methods.plan_cache_flag(p)
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    methods.use_plan_cache(a.cached_plans)
    t0 = time.time()
    rows = run(a.preset, a.reps, a.skip_memory, runs=a.runs, shapes=a.shapes,
               peers=not a.no_peers)
    table = harness.markdown(rows)
    if SUMMARY:
        table += "\n\nThe plan auto chose, against the best plan it could take:\n\n" + \
            methods.auto_table(SUMMARY)
    print(f"\nmachine: {harness.machine()}\n{table}")
    if a.write:
        out = OUT / "out"
        out.mkdir(exist_ok=True)
        harness.write_csv(rows, out / f"rl_{a.preset}.csv")
        (out / f"rl_{a.preset}.md").write_text(
            f"## RL policy losses, preset `{a.preset}`\n\nMachine: {harness.machine()}. Command: "
            f"`python -m bench.rl {' '.join(sys.argv[1:] if argv is None else argv)}` "
            f"({time.time() - t0:.0f} s).\n\n{table}\n")
        harness.write_rows(f"rl_{a.preset}", "python -m bench.rl " +
                           " ".join(sys.argv[1:] if argv is None else argv), table)


if __name__ == "__main__":
    main()
