"""The GPU kernels' cost on paper (no GPU here): FLOPs, bytes, expected H100 time.

    python -m bench.paper

Assumptions, stated once: H100 SXM bf16 dense 790 TFLOP/s and 3.0 TB/s; a Triton tl.dot GEMM tile
loop reaches TRITON_EFF = 0.8 of cuBLAS on the same FLOPs (typical for well-tuned Triton GEMMs on
Hopper; the first thing to measure when a GPU is lent). N = 8192 tokens, bf16 inputs, fp32
accumulation and fp32 grad_W. Each kernel is costed two ways:
  roofline  max(FLOPs / rate, bytes / bandwidth) per kernel, summed over kernels: a GEMM whose
            bytes per FLOP are below the machine's ratio (790/3 = 263 FLOP/B) hides its traffic;
            every GEMM here is at >= 1000 FLOP/B (its inner dimension is H or a chunk of rows);
  additive  FLOPs / rate + bytes / bandwidth for every kernel: no overlap at all, a pessimistic
            bound.
"""
from __future__ import annotations

PEAK, BW, TRITON_EFF = 790e12, 3.0e12, 0.8
SHAPES = {"Llama-3-8B": (4096, 128256), "Qwen2.5-7B": (3584, 152064)}
N = 8192
CHUNK_BYTES = 2**30  # triton_path.g_chunk_rows on CUDA: G / the single-pass tile, 1 GiB
BLOCK_V = 128        # triton_path.DEFAULT_BLOCKS


class Cost:
    def __init__(self):
        self.roof = self.add = self.flops = 0.0

    def kernel(self, flops, bytes_, eff=1.0):
        t_c, t_m = flops / (PEAK * eff), bytes_ / BW
        self.roof += max(t_c, t_m)
        self.add += t_c + t_m
        self.flops += flops


def core_op(H, V):
    """linear_token_logprobs fwd+bwd: Triton forward (logits in registers), chunked backward
    (Triton recompute writes G per chunk, then two cuBLAS GEMMs)."""
    c, F = Cost(), 2 * N * H * V
    nvb = -(-V // BLOCK_V)
    c.kernel(F, (N * H + V * H) * 2 + 4 * 4 * nvb * N, TRITON_EFF)  # _fwd_partials
    c.kernel(0, 2 * 4 * 4 * nvb * N)                                # _fwd_merge
    R = min(N, CHUNK_BYTES // (2 * V))
    for r0 in range(0, N, R):
        n = min(R, N - r0)
        f = 2 * n * H * V
        c.kernel(f, (n * H + V * H) * 2 + n * V * 2, TRITON_EFF)   # _bwd_g_chunk: G written
        c.kernel(f, n * V * 2 + V * H * 2 + n * H * 4)              # G·W -> grad_h
        c.kernel(f, n * V * 2 + n * H * 2 + V * H * 4 * (2 if r0 else 1))  # Gᵀ·h -> grad_W
    return c, -(-N // R), R


def single_pass(H, V, twice_frac=0.0):
    """preference_loss(grad_mode="single_pass") on the triton backend: per chunk a cuBLAS GEMM
    writes the [rows, V] bf16 tile, _logits_fwd then _logits_bwd read it twice and write G over
    it, then G·W and Gᵀ·h (cuBLAS). twice_frac: the share of tokens scored forward first (untied losses:
    the rejected half of one pair; several pairs: all but the longest pair)."""
    c, R = Cost(), min(N, CHUNK_BYTES // (2 * V))
    for part, grad in ((twice_frac, False), (1.0, True)):
        rows = int(N * part)
        for r0 in range(0, rows, R):
            n = min(R, rows - r0)
            f = 2 * n * H * V
            c.kernel(f, (n * H + V * H) * 2 + n * V * 2)            # logits tile (bf16 out)
            c.kernel(0, n * V * 2 * (3 if grad else 1))             # _logits_fwd (+ _logits_bwd)
            if grad:
                c.kernel(f, n * V * 2 + V * H * 2 + n * H * 4)      # G·W -> grad_h
                c.kernel(f, n * V * 2 + n * H * 2 + V * H * 4 * (2 if r0 else 1))
    return c, -(-N // R), R


DESIGNS = [
    ("core op (Triton fwd + chunked bwd)", core_op),
    ("single-pass loss, tied pair (DPO/SimPO)", lambda H, V: single_pass(H, V)),
    ("single-pass loss, untied pair (ORPO/CPO)", lambda H, V: single_pass(H, V, 0.5)),
    ("single-pass loss, 2 tied pairs", lambda H, V: single_pass(H, V, 0.5)),
]


def main():
    print(__doc__)
    print("| model (N=8192) | design | GEMMs done | roofline ms | vs same-FLOP cuBLAS | vs 3-GEMM "
          "floor | additive ms | vs same-FLOP (additive) | largest logits-sized buffer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (H, V) in SHAPES.items():
        t1 = 2 * N * H * V / PEAK
        for label, fn in DESIGNS:
            c, chunks, R = fn(H, V)
            k = c.flops / (2 * N * H * V)
            buf = "none (fwd), " if fn is core_op else ""
            print(f"| {name} H={H} V={V} | {label} | {k:.1f} | {c.roof * 1e3:.1f} | "
                  f"{c.roof / (k * t1):.2f}x | {c.roof / (3 * t1):.2f}x | {c.add * 1e3:.1f} | "
                  f"{c.add / (k * t1):.2f}x | {buf}[{R}, V] bf16 ({R * V * 2 / 2**30:.2f} GiB), "
                  f"{chunks} chunks |")


if __name__ == "__main__":
    main()
