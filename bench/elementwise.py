"""Where the time of the core op goes: GEMMs versus the elementwise work around them.

Runs the op's own forward+backward (alignkit.ops.linear_logprobs.forward_impl / backward_impl)
three ways on the same tiles: with the "cpp" kernels, with the "torch" kernels, and with no-op
kernels (GEMMs, gathers and bookkeeping only). The elementwise share of a backend is its time minus
the no-op time.

    python -m bench.elementwise [--write]
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from alignkit.ops.options import LogprobOptions
from alignkit.ops.tile_kernels import KERNELS, LIVE_TILES
from bench import harness

L = importlib.import_module("alignkit.ops.linear_logprobs")
SHAPES = [
    ("B1 4x1024 H1024 V32000", 4 * 1024, 1024, 32000),
    ("B2 2x512 H384 V151936", 2 * 512, 384, 151936),
    ("B3 1x8192 H256 V32000", 8192, 256, 32000),
    ("B4 1x4096 H256 V128256", 4096, 256, 128256),
]


def _noop(*args, **kwargs):
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    KERNELS["noop"], LIVE_TILES["noop"] = (_noop, _noop), 1
    opts = LogprobOptions()
    lines = ["| shape | GEMM floor (s) | no-op kernels (s) | cpp (s) | torch (s) | cpp / floor "
             "| torch / floor | elementwise cpp (s) | elementwise torch (s) | torch / cpp elementwise |",
             "|---|---|---|---|---|---|---|---|---|---|"]
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

        def run(backend):
            def step():
                L.forward_impl(h, W, y, None, opts, backend)
                L.backward_impl(gl, None, h, W, y, None, lse, None, opts, backend, True, True, False)
            return step
        steps = {"floor": lambda: (hs @ W.t(), G @ W, G.t() @ hs),
                 "noop": run("noop"), "cpp": run("cpp"), "torch": run("torch")}
        t = harness.interleaved_times(steps, warmup=1, reps=a.reps)
        ew_c, ew_t = t["cpp"] - t["noop"], t["torch"] - t["noop"]
        lines.append(f"| {name} | {t['floor']:.3f} | {t['noop']:.3f} | {t['cpp']:.3f} | "
                     f"{t['torch']:.3f} | {t['cpp'] / t['floor']:.2f}x | {t['torch'] / t['floor']:.2f}x | "
                     f"{ew_c:.3f} | {ew_t:.3f} | {ew_t / max(ew_c, 1e-9):.1f}x |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\nmachine: {harness.machine()}\n{table}")
    if a.write:
        out = Path(__file__).parent / "out"
        out.mkdir(exist_ok=True)
        (out / "elementwise.md").write_text(
            f"## Elementwise share: cpp vs torch kernels\n\nMachine: {harness.machine()}. Command: "
            f"`python -m bench.elementwise --write`.\n\n{table}\n")


if __name__ == "__main__":
    main()
