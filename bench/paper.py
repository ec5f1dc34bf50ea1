"""The GPU kernels' cost on paper (no GPU here): FLOPs, bytes, expected H100 time, per kernel as
the launchers schedule them now (alignkit/ops/triton_path.py), beside the previous schedule.

    python -m bench.paper [--report bench/out/gpu-compile.json]

Measured, not assumed: what the kernels compile to for an H100 (sm_90a, bf16), read from
`make gpu-compile`'s report (bench.gpu_compile: the cubins of the default schedules): registers,
spills, shared memory, blocks per SM and the matrix instruction of _fwd_partials, _bwd_g_chunk
and _fwd_merge. The grouped rows' EFF below is only stated for kernels that compile to HGMMA
without spilling; where the report says otherwise (or is absent), the rows say so. The times
themselves stay on paper: nothing here ran on a card.

Assumptions. Each is an assumption until a card measures it (`python -m bench.gpu`, or
`make gpu-check` on a lent machine), not a figure of the card's data sheet:
  CUBLAS     790 TFLOP/s: what a cuBLAS bf16 GEMM of these shapes is assumed to sustain on an
             H100 SXM (about 80% of the 989 TFLOP/s dense bf16 of the data sheet).
  BW         3.0 TB/s: sustained HBM3 bandwidth (about 90% of the data sheet's 3.35 TB/s).
  L2         50 MB.
  EFF        a Triton tile GEMM's rate as a share of cuBLAS's on the same FLOPs:
               grouped  0.75 for the grouped 1-D grid at triton_path's CUDA_LOWP / CUDA_LOWP_BWD
                        tiles (128 x 128 x 64 forward, 128 x 64 x 64 backward, 8 warps, 3
                        stages; their instruction and occupancy are the measured ones below):
                        the class of CCE's and Liger's swizzled H100 kernels;
               previous 0.45 for the 2-D row-fastest grid with 64 x 128 x 64 tiles and 4 warps
                        (the middle of the review's 0.4-0.55).
  STEP       1 us per dependent step of a loop of global loads that nothing else hides (a load's
             round trip is ~0.6-1 us): the merge's cost where its bytes are not.
The model: N = 8192 tokens, bf16 inputs, fp32 grad_W. Each kernel costs
  roofline   max(FLOPs / rate, bytes / BW, dependent steps x STEP), summed over kernels: every
             GEMM here runs at >= 1000 FLOP/byte against the H100's 263, so its traffic hides;
  additive   FLOPs / rate + bytes / BW for every kernel, no overlap at all: a pessimistic bound.
Bytes count what a grid order makes each kernel read from HBM: the grouped grid reads W once and
h once per group of GROUP_V vocab blocks (its working set, GROUP_V x BLOCK_V x H x 2 bytes of W,
fits L2); the previous row-fastest grid read h once per vocab block (h, N x H x 2 = 64 MiB,
does not fit L2).
"""
from __future__ import annotations

import argparse
import json
import os

from alignkit.ops import triton_path as P
from alignkit.ops.options import TileOptions

CUBLAS, BW, L2, STEP = 790e12, 3.0e12, 50e6, 1e-6
SCHEDULES = {  # name: (Triton efficiency, forward BLOCK_V, backward BLOCK_V, GROUP_V or None for
    #                  the 2-D grid, merge steps)
    "grouped": (0.75, P.CUDA_LOWP.block_v, P.CUDA_LOWP_BWD.block_v, P.CUDA_LOWP.group_v,
                P.MERGE_B),
    "previous": (0.45, 128, 128, None, 1),
}
REPORT = "bench/out/gpu-compile.json"
KERNELS = ("_fwd_partials", "_bwd_g_chunk", "_fwd_merge")


def measured(path=REPORT, arch="sm_90a", dtype="bf16"):
    """{kernel: its row} for the default kernels compiled for `arch` in `dtype` (plain variant)
    from bench.gpu_compile's report; None when there is no report."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = json.load(f)["rows"]
    out = {}
    for r in rows:
        if (r["arch"] == arch and r["role"] == "default" and r["variant"] == "plain"
                and r["kernel"] in KERNELS and r["dtype"] == ("fp32" if r["kernel"] ==
                                                            "_fwd_merge" else dtype)
                and r.get("precision") in ("native", "-")):
            out[r["kernel"]] = r
    return out


def supports_eff(rows) -> tuple[bool, str]:
    """Whether the compiled GEMM kernels are what the grouped EFF assumes (HGMMA, no spill)."""
    if rows is None:
        return False, "no gpu-compile report: instruction class and spills unknown (run " \
                      "`make gpu-compile`)"
    bad = [f"{k}: {r.get('error') or ''}{r.get('mma', '')}, {r.get('stack', '?')} B stack"
           for k, r in rows.items() if k != "_fwd_merge" and ("error" in r or r["mma"] != "HGMMA"
                                                                or r["stack"] or r["local"])]
    return (not bad), "; ".join(bad) or "HGMMA, no spills (measured)"


def measured_lines(rows) -> list[str]:
    if not rows:
        return ["Measured: nothing (no bench/out/gpu-compile.json; `make gpu-compile` writes it)."]
    out = ["Measured (cubins for sm_90a, bf16, the default schedules; `make gpu-compile`):", "",
           "| kernel | schedule | regs | stack B | shared KiB | blocks/SM (limit) | mma | "
           "async loads |", "|---|---|---|---|---|---|---|---|"]
    for k in KERNELS:
        r = rows.get(k)
        if not r:
            continue
        if "error" in r:
            out.append(f"| {k} | error: {r['error'][:60]} ||||||")
            continue
        s = r["sched"]
        sch = f"{s[0]}×{s[1]}×{s[2]}, {s[4]} warps, {s[5]} stages" if s else "-"
        out.append(f"| {k} | {sch} | {r['regs']} | {r['stack']} | {r['shared'] / 1024:.0f} | "
                   f"{r['blocks_per_sm']} ({r['occupancy_limit']}) | {r['mma']} | "
                   f"{r['async_loads']} |")
    return out
SHAPES = {"Llama-3-8B": (4096, 128256), "Qwen2.5-7B": (3584, 152064)}
N = 8192
# G of the core op's backward and the single pass's tile: the code's own budget
CHUNK_BYTES = TileOptions().resolved().gpu_chunk_bytes


class Cost:
    def __init__(self):
        self.roof = self.add = self.flops = 0.0

    def kernel(self, flops, bytes_, eff=1.0, steps=0):
        t_c, t_m = flops / (CUBLAS * eff), bytes_ / BW
        self.roof += max(t_c, t_m, steps * STEP)
        self.add += t_c + t_m + steps * STEP
        self.flops += flops


def _h_reads(H, V, block_v, group_v, n):
    """How many times a Triton GEMM kernel over n rows reads h: once per group of vocab blocks
    (grouped), or once per vocab block where the rows' h does not fit L2 (the 2-D grid)."""
    nvb = -(-V // block_v)
    if group_v:
        return -(-nvb // group_v)
    return nvb if n * H * 2 > L2 else 1


def core_op(H, V, schedule="grouped"):
    """linear_token_logprobs fwd+bwd: the Triton forward (logits in registers: _fwd_partials,
    then _fwd_merge), the chunked backward (_bwd_g_chunk writes G per chunk of rows in bf16, two
    cuBLAS GEMMs read it)."""
    eff, bv, bv_bwd, gv, merge_b = SCHEDULES[schedule]
    c, F = Cost(), 2 * N * H * V
    nvb = -(-V // bv)
    parts = 4 * 4 * nvb * N                                          # (m, s, a, t) fp32 per block
    c.kernel(F, V * H * 2 + _h_reads(H, V, bv, gv, N) * N * H * 2 + parts, eff)
    c.kernel(0, parts + 4 * 4 * N, steps=-(-nvb // merge_b))          # _fwd_merge
    R = min(N, CHUNK_BYTES // (2 * V))
    for r0 in range(0, N, R):
        n = min(R, N - r0)
        f = 2 * n * H * V
        c.kernel(f, V * H * 2 + _h_reads(H, V, bv_bwd, gv, n) * n * H * 2 + n * V * 2, eff)
        c.kernel(f, n * V * 2 + V * H * 2 + n * H * 4)              # G·W -> grad_h
        c.kernel(f, n * V * 2 + n * H * 2 + V * H * 4 * (2 if r0 else 1))  # Gᵀ·h -> grad_W
    return c, -(-N // R), R, 4


def _chunks(rows, R):
    for r0 in range(0, rows, R):
        yield r0, min(R, rows - r0)


def single_pass(H, V, deferred=0.0, keep_bytes=None):
    """preference_loss / policy_loss's single pass on the triton backend. Per chunk a cuBLAS GEMM
    writes the fp32 [rows, V] tile; _logits_fwd reads it (row statistics, log-probs);
    _logits_bwd reads it again and writes G in bf16 beside it; G·W and Gᵀ·h run on cuBLAS.
    deferred: the share of tokens whose scalar is known only once every sequence is scored
    (untied losses: all but the longest sequence; several pairs: all but the longest pair).
    Those within the keep budget are formed once with a unit scalar and kept for their two
    GEMMs; the rest are scored first and formed again. The tile rows and the kept rows are the
    code's own (single_pass.tile_rows, keep_rows: CUDA, bf16, triton), keep_bytes its default
    unless given."""
    import torch
    from alignkit.ops.pass_budget import keep_rows, tile_rows
    tiles = TileOptions(keep_bytes=keep_bytes)
    R = min(N, tile_rows(V, "cuda", torch.bfloat16, tiles, H=H, backend="triton"))
    c = Cost()
    n_def = int(N * deferred)
    kept = min(n_def, keep_rows(V, H, "cuda", torch.bfloat16, tiles, backend="triton"))
    twice = n_def - kept
    gw_passes = 0

    def tile(n, grad):
        f = 2 * n * H * V
        c.kernel(f, (n * H + V * H) * 2 + n * V * 4)                # fp32 tile from cuBLAS
        c.kernel(0, n * V * 4 + (n * V * 6 if grad else 0))        # _logits_fwd (+ _logits_bwd)

    def grads(n):
        nonlocal gw_passes
        f = 2 * n * H * V
        c.kernel(f, n * V * 2 + V * H * 2 + n * H * 4)              # G·W -> grad_h
        c.kernel(f, n * V * 2 + n * H * 2 + V * H * 4 * (2 if gw_passes else 1))
        gw_passes += 1
    for _, n in _chunks(twice, R):                                  # scored first
        tile(n, False)
    for _, n in _chunks(N, R):                                      # every token formed once
        tile(n, True)
        grads(n)
    return c, -(-N // R), R, 3 + twice / N


DESIGNS = [
    ("core op, previous schedule", lambda H, V: core_op(H, V, "previous")),
    ("core op, grouped schedule", lambda H, V: core_op(H, V, "grouped")),
    ("single pass, tied pair (DPO/SimPO)", lambda H, V: single_pass(H, V)),
    ("single pass, untied pair (ORPO/CPO)", lambda H, V: single_pass(H, V, 0.5)),
    ("single pass, 2 tied pairs", lambda H, V: single_pass(H, V, 0.5)),
    ("single pass, untied or 2 pairs, keep_bytes = grad_W/2",
     lambda H, V: single_pass(H, V, 0.5, keep_bytes=V * H * 4 // 2)),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description="the GPU kernels' cost on paper")
    ap.add_argument("--report", default=REPORT)
    a = ap.parse_args(argv)
    print(__doc__)
    rows = measured(a.report)
    ok, why = supports_eff(rows)
    print("\n".join(measured_lines(rows)))
    verdict = "matches the compiled kernels" if ok else "is NOT supported by the compiled kernels"
    print(f"\nThe grouped rows' EFF (assumed) {verdict}: {why}. Assumed in every row: CUBLAS, "
          "BW, L2, EFF, STEP; measured: the instruction class, spills and occupancy above.\n")
    print("| model (N=8192) | design | GEMMs done | roofline ms | vs same-FLOP cuBLAS | vs 3-GEMM "
          "floor | additive ms | additive vs same-FLOP | additive vs 3-GEMM floor | largest "
          "logits-sized buffer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (H, V) in SHAPES.items():
        t1 = 2 * N * H * V / CUBLAS
        for label, fn in DESIGNS:
            c, chunks, R, k = fn(H, V)
            if label.startswith("core"):
                buf = f"none (fwd), [{R}, V] bf16 G ({R * V * 2 / 2**30:.2f} GiB)"
            else:
                buf = f"[{R}, V] fp32 tile + bf16 G ({R * V * 6 / 2**30:.2f} GiB)"
            if "grouped" in label and not ok:
                label += " (EFF unsupported: see above)"
            print(f"| {name} H={H} V={V} | {label} | {k:.2f} | {c.roof * 1e3:.1f} | "
                  f"{c.roof / (k * t1):.2f}x | {c.roof / (3 * t1):.2f}x | {c.add * 1e3:.1f} | "
                  f"{c.add / (k * t1):.2f}x | {c.add / (3 * t1):.2f}x | {buf}, {chunks} chunks |")


if __name__ == "__main__":
    main()
