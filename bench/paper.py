"""The GPU kernels' cost on paper (no GPU here): FLOPs, minimum bytes, expected H100 time.

    python -m bench.paper

Assumptions, stated once: H100 SXM bf16 dense 790 TFLOP/s and 3.0 TB/s; a Triton tl.dot GEMM tile
loop reaches TRITON_EFF = 0.8 of cuBLAS on the same FLOPs (typical for well-tuned Triton GEMMs on
Hopper; the first thing to measure when a GPU is lent); a kernel's time is max(compute, memory)
for its dominant phase, summed over phases. N tokens, bf16 inputs, fp32 accumulation.
"""
from __future__ import annotations

PEAK, BW, TRITON_EFF = 790e12, 3.0e12, 0.8
SHAPES = {"Llama-3-8B": (4096, 128256), "Qwen2.5-7B": (3584, 152064)}
N = 8192
G_BYTES = 2**30  # alignkit.ops.triton_path.g_chunk_rows default on CUDA
BLOCK_V = 128


def rows():
    out = []
    for name, (H, V) in SHAPES.items():
        flops = 2 * N * H * V
        t_gemm = flops / PEAK
        hw = (N * H + V * H) * 2
        nvb = -(-V // BLOCK_V)
        # forward: logits tile loop in Triton + 4 fp32 partials per (row, vocab block)
        fwd_bytes = hw + 4 * 4 * nvb * N * 2 + 4 * 4 * N
        fwd = t_gemm / TRITON_EFF + (4 * 4 * nvb * N * 2) / BW
        # backward, chunked mode: recompute+G kernel (Triton), G·W and Gᵀ·h (cuBLAS),
        # G written once and read twice (bf16), grad_W (fp32) read+written once per chunk
        R = min(N, G_BYTES // (2 * V))
        chunks = -(-N // R)
        g_bytes = 3 * N * V * 2
        dw_bytes = chunks * V * H * 4 * 2
        bwd = t_gemm / TRITON_EFF + 2 * t_gemm + (g_bytes + dw_bytes) / BW
        total = fwd + bwd
        out.append((name, H, V, flops, fwd_bytes, fwd, t_gemm, g_bytes + dw_bytes + hw, bwd,
                    total, 4 * t_gemm, 3 * t_gemm, chunks))
    return out


def main():
    print(__doc__)
    print("| model (N=8192) | GEMM FLOPs (1x) | fwd: min bytes | fwd expected | vs 1 cuBLAS GEMM "
          "| bwd: bytes moved | bwd expected | fwd+bwd | vs same-FLOP GEMM (4x) | vs 3-GEMM floor | G chunks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, H, V, flops, fb, fwd, tg, bb, bwd, tot, t4, t3, ch) in rows():
        print(f"| {name} H={H} V={V} | {flops / 1e12:.2f} TFLOP | {fb / 1e9:.2f} GB | "
              f"{fwd * 1e3:.1f} ms | {fwd / tg:.2f}x | {bb / 1e9:.1f} GB | {bwd * 1e3:.1f} ms | "
              f"{tot * 1e3:.1f} ms | {tot / t4:.2f}x | {tot / t3:.2f}x | {ch} |")


if __name__ == "__main__":
    main()
