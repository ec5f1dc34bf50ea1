"""``alignkit bench``: alignkit against every installed peer and the GEMM floor, on your shape.

    alignkit bench --hidden 4096 --vocab 128256 --tokens 2048 --loss dpo
    alignkit bench --model-config path/to/config.json --batch 8 --seq 512 --loss grpo --csv out.csv

The shape: --hidden and --vocab, or --model-config (a transformers config.json: hidden_size,
vocab_size, and the softcap and tied head, shown for reference); the tokens as --tokens N (split
over the sequences) or --batch B --seq L; --pairs P for the preference losses (2P sequences);
--prompt-fraction of each row masked as prompt (not scored). Every method runs on the same inputs
in one process, in interleaved rounds (alignkit.bench.harness.measure, the loop of every
bench), with its exact peak memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from alignkit.bench import harness, methods
from alignkit.ops.options import PLANS, TileOptions

DTYPES = ("auto", "fp32", "bf16")


def _shape(a, p):
    info = {}
    if a.model_config:
        if not os.path.isfile(a.model_config):
            p.error(f"--model-config: {a.model_config!r} is not a file")
        with open(a.model_config) as f:
            conf = json.load(f)
        conf = conf.get("text_config", conf)            # multimodal configs nest the LM's
        for k in ("hidden_size", "vocab_size"):
            if not isinstance(conf.get(k), int):
                p.error(f"--model-config: {a.model_config} has no integer {k}")
        a.hidden = a.hidden or conf["hidden_size"]
        a.vocab = a.vocab or conf["vocab_size"]
        info = {"softcap": conf.get("final_logit_softcapping"),
                "tied head": conf.get("tie_word_embeddings", True)}
    if not a.hidden or not a.vocab:
        p.error("give --hidden and --vocab, or --model-config")
    pref = a.loss in methods.PREFERENCE
    if a.batch is not None or a.seq is not None:
        if a.batch is None or a.seq is None or a.tokens is not None:
            p.error("give --batch with --seq, or --tokens (not both)")
        S, T = a.batch, a.seq
        if pref and S % 2:
            p.error(f"--batch must be even for loss {a.loss} (chosen and rejected rows)")
    else:
        S = 2 * a.pairs if pref or a.loss == "logprobs" else 8
        if a.tokens is None:
            p.error("give --tokens, or --batch and --seq")
        if a.tokens < S:
            p.error(f"--tokens ({a.tokens}) must be at least the {S} sequences")
        T = a.tokens // S
    for k, v in (("hidden", a.hidden), ("vocab", a.vocab), ("batch", S), ("seq", T)):
        if v < 1:
            p.error(f"--{k} must be >= 1, got {v}")
    if not 0 <= a.prompt_fraction < 1:
        p.error(f"--prompt-fraction must be in [0, 1), got {a.prompt_fraction}")
    return S, T, info


def parser():
    p = argparse.ArgumentParser(prog="alignkit bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--model-config", help="a transformers config.json (hidden_size, vocab_size)")
    p.add_argument("--tokens", type=int, help="tokens in all (split over the sequences)")
    p.add_argument("--batch", type=int, help="sequences (with --seq)")
    p.add_argument("--seq", type=int, help="tokens per sequence (with --batch)")
    p.add_argument("--pairs", type=int, default=1, help="preference pairs with --tokens")
    p.add_argument("--prompt-fraction", type=float, default=0.25)
    p.add_argument("--loss", default="dpo", choices=methods.LOSS_KINDS)
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bf16 on CPUs with bf16 units and on CUDA, else fp32")
    p.add_argument("--backend", default="auto")
    p.add_argument("--grad-mode", default="auto")
    p.add_argument("--memory", default=None,
                   help="the engine's memory option: min, bound (default), fast, or bytes")
    p.add_argument("--plan", default=None, choices=PLANS, help="pin one plan")
    p.add_argument("--autotune", type=int, choices=(0, 1), default=None,
                   help="1: measure the plans on the first calls (default); 0: the cost model")
    methods.plan_cache_flag(p)
    p.add_argument("--plans", action="store_true",
                   help="also time every plan of the chooser, pinned, beside auto")
    p.add_argument("--reps", type=int, default=3, help="timing rounds (at most)")
    p.add_argument("--budget", type=float, default=90.0,
                   help="seconds for the timing rounds: fewer rounds (at least one) when "
                        "--reps would not fit")
    p.add_argument("--paired", action="store_true",
                   help="each time / floor as the median of --reps back-to-back (floor, method, "
                        "method, floor) quads, which the machine's drift and the order of a pair "
                        "do not reach (for ratios a few percent apart on a shared machine); "
                        "ignores --budget")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--no-peers", action="store_true", help="alignkit and the floor only")
    p.add_argument("--peers", nargs="*", metavar="NAME",
                   help="only the peers whose name contains one of these (case-insensitive), "
                        "e.g. --peers liger cce")
    p.add_argument("--csv")
    p.add_argument("--json")
    p.add_argument("--plot", help="a PNG of time / floor and peak / memory floor")
    p.add_argument("--write", metavar="NAME", help="save the table as rows for bench/RESULTS.md: "
                   "bench/out/rows/<machine class>/NAME.json (python -m bench.render_results)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(argv=None, log=print) -> dict:
    from alignkit.ops.backends import cpu_has_bf16
    p = parser()
    a = p.parse_args(argv)
    methods.use_plan_cache(a.cached_plans)
    S, T, info = _shape(a, p)
    if a.loss == "distill":
        # distill_loss has one path and no chooser to compare: its plan is the memory option's
        for flag, v in (("--backend", a.backend), ("--grad-mode", a.grad_mode)):
            if v != "auto":
                p.error(f"{flag} {v}: --loss distill has one path (pin a plan with --plan)")
        if a.plans:
            p.error("--plans: --loss distill takes the single pass or, past --memory, the "
                    "recompute; pin one with --plan")
    dtype = a.dtype
    if dtype == "auto":
        dtype = "bf16" if (torch.cuda.is_available() or cpu_has_bf16()) else "fp32"
    name = f"{S}x{T} H{a.hidden} V{a.vocab} {a.loss} {dtype}"
    t_all = time.time()
    case = methods.make_case(name, S, T, a.hidden, a.vocab, seed=a.seed,
                             prompt_fraction=a.prompt_fraction)
    if dtype == "bf16":
        case = methods.case_as(case, torch.bfloat16)
    try:
        memory = int(a.memory) if a.memory is not None and a.memory.isdigit() else a.memory
        tiles = TileOptions(memory=memory, plan=a.plan,
                            autotune=None if a.autotune is None else bool(a.autotune))
        steps, skipped = methods.steps_for(case, a.loss, a.grad_mode, a.backend,
                                           peers=[] if a.no_peers else a.peers, tiles=tiles,
                                           plans=a.plans)
    except ValueError as e:
        p.error(str(e))
    head = (f"alignkit bench: {name}, {int(case.mask.sum())} labelled tokens"
            + "".join(f", {k} {v}" for k, v in info.items()) + f"\nmachine: {harness.machine()}")
    log(head)
    for k, why in skipped.items():
        log(f"  {k}: skipped ({why})")
    for k, c in methods.CHOSEN.items():
        if c is not None:
            log(f"  {k}: plan {c.plan} ({c.how}; feasible: {', '.join(c.feasible)})")
    bar = None
    if not a.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(steps) * (2 + a.reps), desc="bench", dynamic_ncols=True,
                   file=sys.stderr)
    tick = (lambda k: (bar.set_postfix_str(k[:24]), bar.update(1))) if bar else None
    _, rows = harness.measure(name, steps, reset=case.reset, reps=a.reps,
                              grads_mib=case.grads_mib,
                              skip_memory=a.no_memory, log=lambda *x: None, budget_s=a.budget,
                              paired=a.paired,
                              progress=tick, skipped=skipped, floor=next(iter(steps)))
    if bar:
        bar.close()
    table = harness.markdown(rows, shape_column=False)
    if a.plans:
        # methods.auto_against_plans reads the auto row by its plan_steps name
        auto = f"alignkit {'preference' if a.loss in methods.PREFERENCE else 'policy'}_loss " \
            f"({a.grad_mode})"
        renamed = [dataclasses.replace(r, method="alignkit auto") if r.method == auto else r
                   for r in rows]
        table += "\n\nThe plan auto chose, against the best plan it could take:\n\n" + \
            methods.auto_table(methods.auto_against_plans(renamed))
    log(table)
    gemms = "four" if a.loss == "distill" else "three"
    how = f"the median of {a.reps} back-to-back (floor, method, method, floor) quads" \
        if a.paired else "timed in the same rounds"
    log(f"({time.time() - t_all:.0f} s; time / floor: the {gemms}"
        f" GEMMs over the labelled tokens in the same dtype, {how}; memory "
        "floor: grad_W + grad_h)")
    if a.csv:
        harness.write_csv(rows, a.csv)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": dict(S=S, T=T, H=a.hidden, V=a.vocab, loss=a.loss, dtype=dtype,
                                     **info), "machine": harness.machine(),
                       "rows": [row_dict(r) for r in rows]}, f, indent=1)
    if a.plot:
        harness.plot([r for r in rows if r.seconds is not None], a.plot, head.splitlines()[0])
    if a.write:
        cmd = "alignkit bench " + " ".join(sys.argv[1:] if argv is None else argv)
        log("wrote " + harness.write_rows(a.write, cmd.replace(f" --write {a.write}", ""), table))
    return {"rows": rows, "table": table}


def row_dict(r: harness.Row) -> dict:
    return dict(method=r.method, seconds=r.seconds, x_floor=r.x_floor, peak_mib=r.peak_mib,
                x_memory_floor=r.x_grads, note=r.note)


def main(argv=None) -> int:
    run(argv)
    return 0


__all__ = ["run", "main"]
