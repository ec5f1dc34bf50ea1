"""Each default-path Triton kernel, launched alone at its default schedule, timed against its
roofline on the card at hand (bench.gpu_check's second section).

    python -m bench.gpu_roofline [--dry]

A kernel's roofline is max(FLOPs / P, bytes / B): P is what cuBLAS sustains on this card for a
bf16 GEMM of the same shape (torch.mm, timed here), B the copy bandwidth (a 1 GiB clone, 2 bytes
moved per byte, timed here), so both ceilings are measured, not data-sheet figures. Bytes are the
least traffic a kernel can have (each input read once, each output written once). Shape: M rows
of hidden (labelled tokens), Llama-3-8B's head (H=4096, V=128256), bf16. --dry: the same launches
at a tiny shape under the Triton interpreter (checks the arguments; nothing is timed).
"""
from __future__ import annotations

import argparse
import os
import sys


def _cdiv(a, b):
    return -(-a // b)


def cases(M, V, H, device):
    """[(kernel name, launch thunk, FLOPs, bytes)] for the default path's kernels in bf16, with
    the launcher's schedules (triton_path.schedule) and flags off."""
    import torch
    from alignkit.kernels import linear_logprobs as K
    from alignkit.kernels import logits_logprobs as L
    from alignkit.ops import triton_path as P
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = torch.bfloat16
    h = (torch.randn(M, H, generator=g) * 0.05).to(device, dt)
    w = (torch.randn(V, H, generator=g) * 0.05).to(device, dt)
    y = torch.randint(0, V, (M,), generator=g).to(device)
    f32 = dict(dtype=torch.float32, device=device)
    prec = P.precision(h)
    fs, bs = P.schedule(h), P.schedule(h, backward=True)
    nvb = _cdiv(V, fs.block_v)
    parts = [torch.empty(nvb, M, **f32) for _ in range(4)]
    outs = [torch.empty(M, **f32) for _ in range(4)]
    lse_m, logs = outs[1], outs[2]
    gvec = torch.full((M,), 1.0 / M, **f32)
    G = torch.empty(M, V, dtype=dt, device=device)
    x = torch.randn(M, V, generator=g).to(device)
    scal = (1.0, 1.0)

    def fwd():
        K._fwd_partials[(_cdiv(M, fs.block_n) * nvb,)](
            h, w, y, h, *parts, M, V, H, P.m_bucket(M), h.stride(0), w.stride(0), *scal,
            HAS_BIAS=False, HAS_SOFTCAP=False, PRECISION=prec, **P._launch(fs, H))

    def merge():
        K._fwd_merge[(_cdiv(M, P.MERGE_N),)](*parts, *outs, M, nvb, BLOCK_N=P.MERGE_N,
                                             BLOCK_B=P.MERGE_B)

    def g_chunk():
        K._bwd_g_chunk[(_cdiv(M, bs.block_n) * _cdiv(V, bs.block_v),)](
            h, w, y, h, lse_m, logs, gvec, gvec, gvec, G, M, V, H, P.m_bucket(M), h.stride(0),
            w.stride(0), G.stride(0), *scal, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_ENT=False,
            PRECISION=prec, **P._launch(bs, H))

    def logits_fwd():
        L._logits_fwd[(M,)](x, y, *outs, M, V, x.stride(0), 1.0, 1.0, -100, HAS_SOFTCAP=False,
                            BLOCK_V=P.LOGITS_BLOCK_V)

    def logits_bwd():
        L._logits_bwd[(M,)](x, x, y, lse_m, logs, gvec, gvec, gvec, M, V, x.stride(0),
                            x.stride(0), 1.0, 1.0, HAS_SOFTCAP=False, HAS_ENT=False,
                            BLOCK_V=P.LOGITS_BLOCK_V)

    F = 2 * M * H * V
    return [("_fwd_partials", fwd, F, (V * H + M * H) * 2 + 16 * nvb * M),
            ("_fwd_merge", merge, 0, 16 * nvb * M + 16 * M),
            ("_bwd_g_chunk", g_chunk, F, (V * H + M * H) * 2 + M * V * 2),
            ("_logits_fwd", logits_fwd, 0, M * V * 4),
            ("_logits_bwd", logits_bwd, 0, M * V * 8)]


def ceilings(M, V, H):
    """(bf16 GEMM FLOP/s of cuBLAS at this shape, copy bytes/s), both timed on this card."""
    import torch
    from triton.testing import do_bench
    a = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(V, H, device="cuda", dtype=torch.bfloat16)
    t_mm = do_bench(lambda: torch.mm(a, b.t())) * 1e-3
    buf = torch.empty(1 << 29, device="cuda", dtype=torch.float16)     # 1 GiB
    t_cp = do_bench(lambda: buf.clone()) * 1e-3
    return 2 * M * H * V / t_mm, 2 * buf.numel() * 2 / t_cp


def table(M=4096, V=128256, H=4096, dry=False) -> list[str]:
    if dry:                              # the interpreter: run each launch once, tiny and odd
        cs = cases(37, 300, 64, "cpu")
        for name, fn, _, _ in cs:
            fn()
        return [f"dry run: the {len(cs)} default kernels ({', '.join(c[0] for c in cs)}) "
                "launched once under the interpreter at M=37, V=300, H=64; not timed (no card)"]
    from triton.testing import do_bench
    P_, B_ = ceilings(M, V, H)
    out = [f"M={M}, V={V}, H={H}, bf16. Ceilings measured here: cuBLAS bf16 GEMM "
           f"{P_ / 1e12:.0f} TFLOP/s, copy {B_ / 1e9:.0f} GB/s.", "",
           "| kernel | ms | roofline ms | x roofline | bound |", "|---|---|---|---|---|"]
    for name, fn, flops, nbytes in cases(M, V, H, "cuda"):
        t = do_bench(fn) * 1e-3
        tc, tm = flops / P_, nbytes / B_
        roof = max(tc, tm)
        out.append(f"| {name} | {t * 1e3:.3f} | {roof * 1e3:.3f} | {t / roof:.2f} | "
                   f"{'compute' if tc >= tm else 'memory'} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args(argv)
    if a.dry and os.environ.get("TRITON_INTERPRET") != "1":
        print("--dry needs TRITON_INTERPRET=1 (set before triton is imported)", file=sys.stderr)
        return 2
    print("\n".join(table(dry=a.dry)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
