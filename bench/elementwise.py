"""Where the time of the core op goes: GEMMs versus the elementwise work around them.

Runs the op's own forward+backward (alignkit.ops.linear_logprobs.forward_impl / backward_impl)
with the "cpp" and with the "torch" tile kernels on the same inputs, and clocks the time spent
inside the tile kernels (fold + grad: everything but the GEMMs and bookkeeping) directly, around
each call. Subtracting two noisy end-to-end times on this machine gave meaningless differences;
timing the calls themselves does not.

    python -m bench.elementwise [--write]
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch

from alignkit.ops.options import LogprobArgs
from alignkit.ops.tile_kernels import KERNELS, LIVE_TILES
from alignkit.bench import harness


L = importlib.import_module("alignkit.ops.linear_logprobs")
SHAPES = [
    ("B1 4x1024 H1024 V32000", 4 * 1024, 1024, 32000),
    ("B2 2x512 H384 V151936", 2 * 512, 384, 151936),
    ("B3 1x8192 H256 V32000", 8192, 256, 32000),
    ("B4 1x4096 H256 V128256", 4096, 256, 128256),
]


def _clocked(backend, acc):
    """The backend's (fold, grad), each call's wall time added to acc[0]."""
    fold, grad = KERNELS[backend]

    def wrap(fn):
        def inner(*a, **k):
            t0 = time.perf_counter()
            fn(*a, **k)
            acc[0] += time.perf_counter() - t0
        return inner
    return wrap(fold), wrap(grad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    opts = LogprobArgs()
    lines = ["| shape | GEMM floor (s) | cpp total (s) | torch total (s) | cpp / floor | torch / floor "
             "| cpp kernels (s) | torch kernels (s) | torch / cpp kernels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, N, H, V in SHAPES:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, H, generator=g)
        W = torch.randn(V, H, generator=g) / H**0.5
        y = torch.randint(0, V, (N,), generator=g)
        y[: N // 4] = -100
        hs = h[y != -100]
        G = torch.randn(hs.shape[0], V, generator=g)
        gl = torch.randn(N, generator=g)
        _, _, lse = L.forward_impl(h, W, y, None, opts, "cpp")
        clocks = {}

        def run(backend):
            acc = clocks.setdefault(backend, [0.0])
            KERNELS[f"clocked-{backend}"] = _clocked(backend, acc)
            LIVE_TILES[f"clocked-{backend}"] = LIVE_TILES[backend]

            def step():
                L.forward_impl(h, W, y, None, opts, f"clocked-{backend}")
                L.backward_impl(gl, None, h, W, y, None, lse, None, opts, f"clocked-{backend}",
                                True, True, False)
            return step
        steps = {"floor": lambda: (hs @ W.t(), G @ W, G.t() @ hs), "cpp": run("cpp"),
                 "torch": run("torch")}
        t = harness.interleaved_times(steps, warmup=1, reps=a.reps)
        runs = 1 + a.reps  # warm-up included in the clocks
        k_c, k_t = clocks["cpp"][0] / runs, clocks["torch"][0] / runs
        lines.append(f"| {name} | {t['floor']:.3f} | {t['cpp']:.3f} | {t['torch']:.3f} | "
                     f"{t['cpp'] / t['floor']:.2f}x | {t['torch'] / t['floor']:.2f}x | "
                     f"{k_c:.3f} | {k_t:.3f} | {k_t / k_c:.1f}x |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\nmachine: {harness.machine()}\n{table}")
    if a.write:
        out = Path(__file__).parent / "out"
        out.mkdir(exist_ok=True)
        (out / "elementwise.md").write_text(
            f"## Elementwise share: cpp vs torch kernels\n\nMachine: {harness.machine()}. Command: "
            f"`python -m bench.elementwise --write`.\n\n{table}\n")
        harness.write_rows("elementwise", "python -m bench.elementwise --write", table)


if __name__ == "__main__":
    main()
