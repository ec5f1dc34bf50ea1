"""RL policy losses from hidden states (issue #15): one fwd+bwd of a policy loss, alignkit's
policy_loss (auto: the token pass, 3 GEMMs; and the recompute, 4) against naive full logits, TRL
1.16's ChunkedLogProbFunction log-probs, Liger's LigerFusedLinearGRPOLoss (eager and compiled),
and the 3-GEMM floor. The naive and TRL rows run the same loss math on their log-probs
(alignkit.losses.policy.policy_terms), so only the head differs.

    python -m bench.rl [--preset small|full] [--reps 3] [--write]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import alignkit
from alignkit.losses.policy import policy_loss_from_logprobs
from bench import harness, methods

OUT = Path(__file__).parent
SMALL = [("R2 16x256 H512 V32000", 16, 256, 512, 32000),
         ("R3 2x8192 H256 V32000", 2, 8192, 256, 32000)]
PRESETS = {"small": SMALL, "full": [("R1 8x512 H1024 V151936", 8, 512, 1024, 151936)] + SMALL}
RUNS = [("dapo", dict(loss_type="dapo")),
        ("grpo beta=0.04", dict(loss_type="grpo", beta=0.04)),
        ("dapo + entropy bonus", dict(loss_type="dapo", entropy_coef=0.01))]


def rl_inputs(case, seed=1):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(case.S, generator=g)
    old = -3 + 0.1 * torch.randn(case.S, case.T, generator=g)
    ref = -3 + 0.1 * torch.randn(case.S, case.T, generator=g)
    return adv, old, ref


def _terms(lp, ent, case, adv, old, ref, kw):
    """The policy loss on per-token log-probs [S, T] (and entropies), as policy_loss computes it."""
    return policy_loss_from_logprobs(lp, ent, case.y, advantages=adv, old_logprobs=old,
                                     ref_logprobs=ref if kw.get("beta") else None, **kw)[0]


def alignkit_policy(kw, grad_mode):
    def setup(case):
        adv, old, ref = rl_inputs(case)
        extra = dict(ref_logprobs=ref) if kw.get("beta") else {}
        return lambda: alignkit.policy_loss(case.h, case.W, case.y, advantages=adv,
                                            old_logprobs=old, grad_mode=grad_mode, **extra,
                                            **kw)[0].backward()
    return setup


def naive(kw):
    def setup(case):
        adv, old, ref = rl_inputs(case)

        def step():
            logp = torch.log_softmax((case.h @ case.W.t()).float(), -1)
            lp = logp.gather(-1, case.y.clamp(min=0)[..., None]).squeeze(-1) * case.mask
            ent = -(logp.exp() * logp).sum(-1) if kw.get("entropy_coef") else None
            _terms(lp, ent, case, adv, old, ref, kw).backward()
        return step
    return setup


def trl_chunked(kw):
    def setup(case):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as CHUNK
        adv, old, ref = rl_inputs(case)
        outputs = ("entropy",) if kw.get("entropy_coef") else ()

        def step():
            out = ChunkedLogProbFunction.apply(case.h.reshape(-1, case.H), case.W, None,
                                               case.y.clamp(min=0).reshape(-1), 1.0, CHUNK, None,
                                               1.0, outputs)
            lp = out[0].view(case.S, case.T) * case.mask
            ent = out[1].view(case.S, case.T) if outputs else None
            _terms(lp, ent, case, adv, old, ref, kw).backward()
        return step
    return setup


def liger(kw, compiled):
    def setup(case):
        if kw.get("entropy_coef"):
            raise NotImplementedError("LigerFusedLinearGRPOLoss has no entropy bonus")
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        adv, old, ref = rl_inputs(case)
        beta = kw.get("beta", 0.0)
        fn = LigerFusedLinearGRPOLoss(beta=beta, compiled=compiled, use_ref_model=beta > 0,
                                      loss_type=kw["loss_type"], max_completion_length=case.T)
        mask = case.mask.long()
        y = case.y.clamp(min=0)
        return lambda: fn(case.h, case.W, y, mask, adv, ref_per_token_logps=ref if beta else None,
                          old_per_token_logps=old)[0].backward()
    return setup


def run(preset, reps, skip_memory, log=print):
    rows = []
    for name, S, T, H, V in PRESETS[preset]:
        case = methods.make_case(name, S, T, H, V)
        grads_mib = (V * H + S * T * H) * 4 / 2**20
        for label, kw in RUNS:
            steps = {harness.FLOOR: methods.floor(case),
                     "alignkit policy_loss (auto: token pass)": alignkit_policy(kw, "auto")(case),
                     "alignkit policy_loss (recompute)": alignkit_policy(kw, "recompute")(case),
                     "naive full logits + loss": naive(kw)(case),
                     "TRL chunked log-probs + loss": trl_chunked(kw)(case)}
            for compiled in (False, True):
                try:
                    steps[f"Liger GRPO ({'compiled' if compiled else 'eager'})"] = \
                        liger(kw, compiled)(case)
                except NotImplementedError as e:
                    log(f"  Liger: {e}")
            rows += harness.measure(f"{name} {label}", steps, reset=case.reset, reps=reps,
                                    grads_mib=grads_mib, skip_memory=skip_memory, log=log)[1]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    t0 = time.time()
    rows = run(a.preset, a.reps, a.skip_memory)
    table = harness.markdown(rows)
    print(f"\nmachine: {harness.machine()}\n{table}")
    if a.write:
        out = OUT / "out"
        out.mkdir(exist_ok=True)
        harness.write_csv(rows, out / f"rl_{a.preset}.csv")
        (out / f"rl_{a.preset}.md").write_text(
            f"## RL policy losses, preset `{a.preset}`\n\nMachine: {harness.machine()}. Command: "
            f"`python -m bench.rl {' '.join(sys.argv[1:] if argv is None else argv)}` "
            f"({time.time() - t0:.0f} s).\n\n{table}\n")


if __name__ == "__main__":
    main()
