"""shared_prompt's rejected response on CPU: its R queries over [prompt (P), own (R)] keys, three
ways, forward + backward of one attention call (bench.trainer's heads: 4 heads, D=64, fp32):

- merge: ``alignkit.model.prefix_attention.prefix_causal``, the prompt block and the own causal block
  as two flash calls merged by log-sum-exp (R·P + R²/2 scores, no mask);
- mask: SDPA with a bottom-right causal [R, P + R] bool mask (R·(P + R) scores; the varlen path
  before, within its 4 MiB mask budget, and the KV-cache path's second pass);
- prompt again: the prompt's queries run too, plain causal, their outputs dropped ((P + R)²/2;
  the varlen path before, past the mask budget).

    python -m bench.prefix_attention [--lengths 256,512,1024,2048,4096] [--rounds 7]

Interleaved rounds (alignkit.bench.harness.interleaved_times), each run 2 calls; P = R = length.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from alignkit.bench.harness import emit, interleaved_times, machine
from alignkit.model.prefix_attention import prefix_causal

HEADS, D = 4, 64


def ways(P: int, R: int, seed: int = 0):
    """The three ways as forward calls on one set of leaves: ({name: fn() -> [1, HEADS, R, D]},
    leaves, the output gradient)."""
    g = torch.Generator().manual_seed(seed)
    q, kp, vp, k, v, qp = (torch.randn(1, HEADS, n, D, generator=g).requires_grad_()
                           for n in (R, P, P, R, R, P))
    gout = torch.randn(1, HEADS, R, D, generator=g)
    mask = torch.ones(R, P + R, dtype=torch.bool).tril(P)
    scale = D ** -0.5

    def merge():
        return prefix_causal(q, kp, vp, k, v, scale)

    def masked():
        return F.scaled_dot_product_attention(q, torch.cat([kp, k], 2), torch.cat([vp, v], 2),
                                              attn_mask=mask, scale=scale)

    def again():          # qp: the prompt's queries, whose outputs are dropped
        return F.scaled_dot_product_attention(torch.cat([qp, q], 2), torch.cat([kp, k], 2),
                                              torch.cat([vp, v], 2), is_causal=True,
                                              scale=scale)[:, :, P:]
    return {"merge": merge, "mask": masked, "prompt again": again}, (q, kp, vp, k, v, qp), gout


def steps_for(P: int, R: int, seed: int = 0):
    """({name: step}, reset): each step two fwd+bwd calls of one way; reset drops the grads."""
    fns, leaves, gout = ways(P, R, seed)

    def run(fn):
        def step():
            for _ in range(2):
                fn().backward(gout)
        return step

    def reset():
        for t in leaves:
            t.grad = None
    return {k: run(fn) for k, fn in fns.items()}, reset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--write", action="store_true", help="write bench/out/prefix_attention.md")
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    lines = [f"machine: {machine()}", "",
             f"one attention call fwd+bwd, {HEADS} heads, D={D}, fp32; P = R; median of "
             f"{a.rounds} interleaved rounds", "",
             "| P = R | merge ms | mask ms | prompt again ms | merge vs mask | merge vs prompt "
             "again |", "|---|---|---|---|---|---|"]
    for n in (int(x) for x in a.lengths.split(",")):
        steps, reset = steps_for(n, n)
        t = interleaved_times(steps, warmup=1, reps=a.rounds, reset=reset)
        ms = {k: v / 2 * 1e3 for k, v in t.items()}
        lines.append(f"| {n} | {ms['merge']:.1f} | {ms['mask']:.1f} | {ms['prompt again']:.1f} | "
                     f"{ms['mask'] / ms['merge']:.2f}x | "
                     f"{ms['prompt again'] / ms['merge']:.2f}x |")
        print(lines[-1], flush=True)
    emit(lines, a.write, "prefix_attention", "bench.prefix_attention")


if __name__ == "__main__":
    main()
