"""Fused preference losses from hidden states: DPO, SimPO, ORPO fwd+bwd against the peers.

    python -m bench.losses --preset full --write     # B1-B3 and the long pair
    python -m bench.losses --preset small
    python -m bench.losses --preset full --auto-only --reps 7 --write   # the targets table
    python -m bench.losses --preset full --keep --write    # the single pass's keep budget
    python -m bench.losses --preset full --plans --write   # auto beside every plan, and CCE

Methods per loss: alignkit.preference_loss; naive full logits + the same loss; Liger's fused loss
(compiled=False and True); TRL's ChunkedLogProbFunction log-probs + the loss math; the GEMM floor
(three GEMMs over the labelled tokens). Same inputs, one process, interleaved timing rounds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from alignkit.bench import harness, methods

PRESETS = {
    "small": [("S1 2x256 H256 V8000", 2, 256, 256, 8000)],
    "full": [
        ("B1 4x1024 H1024 V32000", 4, 1024, 1024, 32000),
        ("B2 2x512 H384 V151936", 2, 512, 384, 151936),
        # B3 is one 8192-token row in the core bench; a loss needs pairs: the same tokens as 2x4096
        ("B3 2x4096 H256 V32000", 2, 4096, 256, 32000),
        ("long pair 2x8192 H256 V32000", 2, 8192, 256, 32000),
    ],
}
LOSSES = methods.PREFERENCE
OUT = Path(__file__).parent
alignkit_fused, liger = methods.alignkit_fused, methods.liger_pref


def keep_steps(case, loss):
    """The single pass's keep budget (TileOptions.keep_bytes) against the recompute and CCE:
    no budget beyond the tile (the deferred tokens past the tile's rows formed twice), the
    default (3/10 of grad_W), and one that keeps every deferred token (3 GEMMs for all)."""
    from alignkit import TileOptions
    every = TileOptions(keep_bytes=case.S * case.T * case.V * 4)
    sp = lambda tiles: alignkit_fused(loss, "single_pass", tiles=tiles)(case)  # noqa: E731
    return {"alignkit auto": alignkit_fused(loss)(case),
            "alignkit recompute": alignkit_fused(loss, "recompute")(case),
            "alignkit single_pass, keep_bytes=0": sp(TileOptions(keep_bytes=0)),
            "alignkit single_pass, default keep": sp(None),
            "alignkit single_pass, keep every deferred token": sp(every),
            "CCE torch_compile + loss": methods.peer_step("CCE torch_compile", loss)(case)}


# (shape, auto's plan, ...) of each plan measurement this process ran (methods.auto_against_plans)
SUMMARY: list = []


def run(preset, losses, reps, skip_memory, shapes=None, log=print, only_alignkit=False,
        auto_only=False, bf16=False, keep=False):
    rows = []
    for name, S, T, H, V in PRESETS[preset]:
        if shapes and not any(x in name for x in shapes):
            continue
        case = methods.make_case(name, S, T, H, V)
        for loss in losses:
            steps = {harness.FLOOR: methods.floor(case)}
            reset = case.reset
            if bf16:                                # bf16 inputs against fp32, both modes
                c16 = methods.case_as(case, torch.bfloat16)
                steps["GEMM floor in bf16 (3 GEMMs)"] = methods.floor(c16)
                steps["alignkit auto, fp32"] = alignkit_fused(loss)(case)
                steps["alignkit auto, bf16"] = alignkit_fused(loss)(c16)
                steps["alignkit recompute, bf16"] = alignkit_fused(loss, "recompute")(c16)
                steps["alignkit single_pass, bf16"] = alignkit_fused(loss, "single_pass")(c16)
                reset = lambda c16=c16: (case.reset(), c16.reset())  # noqa: E731
            elif keep:
                steps.update(keep_steps(case, loss))
            elif auto_only:                           # the default mode against the floor
                steps["alignkit preference_loss (auto)"] = alignkit_fused(loss)(case)
            elif only_alignkit:                     # auto beside every plan it picks from
                steps.update(methods.plan_steps(case, loss))
                steps["CCE torch_compile + loss"] = methods.peer_step("CCE torch_compile",
                                                                      loss)(case)
            else:
                steps["alignkit preference_loss (auto)"] = alignkit_fused(loss)(case)
                steps.update({"naive full logits": methods.peer_step("naive full logits",
                                                                     loss)(case),
                              "TRL chunked log-probs + loss": methods.peer_step(
                                  "TRL ChunkedLogProbFunction", loss)(case),
                              "Liger fused (eager)": liger(loss, False)(case),
                              "Liger fused (compiled)": liger(loss, True)(case)})
            got = harness.measure(f"{name} {loss.upper()}", steps, reset=reset, reps=reps,
                                  grads_mib=case.grads_mib, skip_memory=skip_memory, log=log,
                                  paired=auto_only)[1]
            rows += got
            if only_alignkit:
                SUMMARY.extend(methods.auto_against_plans(got))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--losses", nargs="*", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shapes", nargs="*", help="substrings of shape names to run (default: all)")
    p.add_argument("--skip-memory", action="store_true")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--plans", "--only-alignkit", dest="only_alignkit", action="store_true",
                       help="the floor, alignkit's auto (and auto at memory=fast) beside every "
                            "plan of the chooser, pinned, and CCE torch_compile")
    which.add_argument("--bf16", action="store_true",
                       help="alignkit with bf16 inputs (auto, recompute, single_pass) beside fp32 "
                            "auto, against the fp32 and the bf16 GEMM floors")
    which.add_argument("--auto-only", action="store_true",
                       help="the floor and alignkit's default (auto) only, in back-to-back "
                            "(floor, auto, auto, floor) quads: ratio = their median (the targets' "
                            "table)")
    which.add_argument("--keep", action="store_true",
                       help="the single pass's keep budget (none, the default, every deferred "
                            "token) beside auto, the recompute and CCE")
    methods.plan_cache_flag(p)
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    methods.use_plan_cache(a.cached_plans)
    t0 = time.time()
    rows = run(a.preset, a.losses, a.reps, a.skip_memory, a.shapes, only_alignkit=a.only_alignkit,
               auto_only=a.auto_only, bf16=a.bf16, keep=a.keep)
    table = harness.markdown(rows)
    if SUMMARY:
        table += "\n\nThe plan auto chose, against the best plan it could take:\n\n" + \
            methods.auto_table(SUMMARY)
    print(f"\nmachine: {harness.machine()}\n{table}")
    if a.write:
        out = OUT / "out"
        out.mkdir(exist_ok=True)
        tag = a.preset + ("_auto" if a.auto_only else "_alignkit" if a.only_alignkit
                          else "_bf16" if a.bf16 else "_keep" if a.keep else "")
        harness.write_csv(rows, out / f"losses_{tag}.csv")
        if not (a.auto_only or a.only_alignkit or a.bf16 or a.keep):
            harness.plot(rows, OUT / f"losses_{a.preset}.png",
                         "alignkit fused losses, fwd+bwd (CPU)")
        (out / f"losses_{tag}.md").write_text(
            f"## Fused losses, preset `{a.preset}`\n\nMachine: {harness.machine()}. Command: "
            f"`python -m bench.losses {' '.join(sys.argv[1:] if argv is None else argv)}` "
            f"({time.time() - t0:.0f} s)."
            f"\n\n{table}\n")
        harness.write_rows(f"losses_{tag}", "python -m bench.losses " +
                           " ".join(sys.argv[1:] if argv is None else argv), table)


if __name__ == "__main__":
    main()
