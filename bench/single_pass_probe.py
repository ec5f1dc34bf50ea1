"""Why the fused losses recompute: the GEMM cost of a single-pass gradient, measured.

A single-pass gradient (3 GEMMs) must hold each token's whole vocabulary row while its tile is
alive (p needs the final log-sum-exp), so its tiles are [rows, V] with rows = budget / (4·V);
the recompute path (4 GEMMs) uses [rows, 2048] tiles. This times exactly the GEMMs of each plan
(no elementwise work), interleaved, at the bench shapes and two budgets:

    python -m bench.single_pass_probe
"""
from __future__ import annotations

import torch

from alignkit.ops import tiling
from alignkit.bench import harness

SHAPES = [("B1 4x1024 H1024 V32000", 3072, 1024, 32000),
          ("B2 2x512 H384 V151936", 768, 384, 151936),
          ("B3 2x4096 H256 V32000", 6144, 256, 32000)]


def single_pass(h, W, rows):
    M, H = h.shape
    V = W.shape[0]
    buf = torch.empty(rows * V)
    gw = torch.zeros(V, H)

    def step():
        gw.zero_()
        for r0 in range(0, M, rows):
            hc = h[r0:r0 + rows]
            t = buf[: hc.shape[0] * V].view(hc.shape[0], V)
            torch.mm(hc, W.t(), out=t)   # logits (kept alive: p and G come from it)
            torch.mm(t, W)               # G·W  -> grad_h rows
            gw.addmm_(t.t(), hc)         # Gᵀ·h -> grad_W (the pair accumulator)
    return step


def recompute(h, W, budget):
    M, H = h.shape
    V = W.shape[0]
    p = tiling.plan(M, H, V, budget)
    buf = torch.empty(p.rows * p.vocab_block)
    gw = torch.zeros(V, H)

    def step():
        gw.zero_()
        for r0 in range(0, M, p.rows):
            hc = h[r0:r0 + p.rows]
            for v0 in range(0, V, p.vocab_block):
                wb = W[v0:v0 + p.vocab_block]
                t = buf[: hc.shape[0] * wb.shape[0]].view(hc.shape[0], wb.shape[0])
                torch.mm(hc, wb.t(), out=t)      # forward
            gh = torch.zeros(hc.shape[0], H)
            for v0 in range(0, V, p.vocab_block):
                wb = W[v0:v0 + p.vocab_block]
                t = buf[: hc.shape[0] * wb.shape[0]].view(hc.shape[0], wb.shape[0])
                torch.mm(hc, wb.t(), out=t)      # recompute
                gh.addmm_(t, wb)
                gw[v0:v0 + wb.shape[0]].addmm_(t.t(), hc)
    return step


def main():
    print("| shape | budget | single-pass rows | single-pass 3 GEMMs (s) | recompute 4 GEMMs (s) "
          "| 3-GEMM floor (s) | single-pass / floor | recompute / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for name, M, H, V in SHAPES:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(M, H, generator=g)
        W = torch.randn(V, H, generator=g) / H**0.5
        G = torch.randn(M, V, generator=g)
        for budget in (16 * 2**20, 64 * 2**20):
            rows = max(1, budget // (4 * V))
            steps = {"floor": lambda: (h @ W.t(), G @ W, G.t() @ h),
                     "single": single_pass(h, W, rows), "recompute": recompute(h, W, budget)}
            t = harness.interleaved_times(steps, warmup=1, reps=3)
            print(f"| {name} | {budget >> 20} MiB | {rows} | {t['single']:.3f} | "
                  f"{t['recompute']:.3f} | {t['floor']:.3f} | {t['single'] / t['floor']:.2f}x | "
                  f"{t['recompute'] / t['floor']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
