"""GPU bench mode (needs a CUDA device, or --dry for the interpreter on CPU).

    python -m bench.gpu [--shapes llama3-8b qwen2.5-7b] [--tokens 8192] [--dtype bf16] [--dry]

Per shape, fwd and fwd+bwd of per-token log-probs from hidden states, timed with
triton.testing.do_bench (``return_mode="median"``, after its warm-up) over a rotation of 4 input
sets so that no run reads another's cache. Reports ms, TFLOP/s (on the GEMM FLOPs the method must
do: 2·N·H·V forward, 3x that for fwd+bwd) and GB/s on the minimum bytes (h, W read once; grads
written once), side by side for: alignkit (triton backend), TRL's ChunkedLogProbFunction (its
Triton kernel), Liger's fused linear cross-entropy, Apple's cut-cross-entropy (impl="cce"),
torch's chunked F.linear_cross_entropy, and the cuBLAS GEMM of the same FLOPs. A peer that is not
installed is reported as skipped.

Then the fused losses (one pair of N/2 + N/2 tokens, DPO and ORPO) fwd+bwd:
preference_loss with grad_mode="recompute" and "single_pass" (backend="triton": the cuBLAS tile
GEMMs and the logits kernels on the tile), against Liger's fused DPO / ORPO and the 3 cuBLAS GEMMs.

``--dry``: the same tables on CPU under TRITON_INTERPRET=1 at a tiny shape (H=64, V=1000,
N=64), wall-clock medians of 3 runs, alignkit and torch only: it proves the script runs (CI), not
speed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"llama3-8b": (4096, 128256), "qwen2.5-7b": (3584, 152064), "dry": (64, 1000)}
PEERS = ("TRL chunked (triton)", "Liger FLCE", "CCE (cce)")


def _methods():
    import alignkit

    def alignkit_(h, W, y):
        return alignkit.linear_token_logprobs(h, W, y, backend="triton")

    def trl(h, W, y):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as C
        return ChunkedLogProbFunction.apply(h, W, None, y, 1.0, C, None, 1.0, ())[0]

    def liger(h, W, y):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return -liger_fused_linear_cross_entropy(h, W, y, reduction="none")

    def cce(h, W, y):
        from cut_cross_entropy import linear_cross_entropy
        return -linear_cross_entropy(h, W, y, reduction="none", impl="cce")

    def torch_lce(h, W, y):
        return -F.linear_cross_entropy(h, W, y, reduction="none",
                                       options=torch.nn.LinearCrossEntropyOptions())
    return {"alignkit (triton)": alignkit_, "TRL chunked (triton)": trl, "Liger FLCE": liger,
            "CCE (cce)": cce, "torch LCE chunked": torch_lce}


def _timer(dry):
    if not dry:
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, return_mode="median")

    def wall(fn):
        fn()                                            # warm-up (the interpreter's first call)
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    return wall


def _failed(exc):
    if isinstance(exc, ImportError):                  # its wheel is not on this machine
        return f"skipped: not installed ({exc.name or exc})"
    return f"failed: {type(exc).__name__}: {exc}"


def run(shapes, tokens, dtype="bf16", dry=False, out=print):
    """The tables, each line passed to ``out``. Returns 0, or 2 without a device."""
    if not dry and not torch.cuda.is_available():
        out("bench.gpu needs a CUDA device (or --dry); on CPU use bench.core / bench.losses.")
        return 2
    dev = "cpu" if dry else "cuda"
    bench = _timer(dry)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    where = "CPU, Triton interpreter (dry run)" if dry else torch.cuda.get_device_name()
    out(f"device: {where}, dtype {dtype}, N={tokens}, torch {torch.__version__}")
    out("")
    out("| shape | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd GB/s |")
    out("|---|---|---|---|---|---|---|")
    for name in shapes:
        H, V = SHAPES[name]
        N = tokens
        sets = [(torch.randn(N, H, device=dev, dtype=dt, requires_grad=True),
                 (torch.randn(V, H, device=dev, dtype=dt) / H**0.5).requires_grad_(),
                 torch.randint(0, V, (N,), device=dev)) for _ in range(4)]
        flops = 2 * N * H * V
        bytes_ = (N * H + V * H) * dt.itemsize * 2  # read h, W; write grad_h, grad_W
        it = iter(range(10**9))

        def pick():
            return sets[next(it) % len(sets)]
        G = torch.randn(N, V, device=dev, dtype=dt)
        gemm = bench(lambda: (lambda h, W, y: h @ W.t())(*pick()))
        gemm3 = bench(lambda: (lambda h, W, y: (h @ W.t(), G @ W, G.t() @ h))(*pick()))
        out(f"| {name} | GEMM (1 / 3 GEMMs) | {gemm:.2f} | {flops / gemm / 1e9:.0f} | "
            f"{gemm3:.2f} | {3 * flops / gemm3 / 1e9:.0f} | |")
        for mname, fn in _methods().items():
            if dry and mname in PEERS:
                out(f"| {name} | {mname} | skipped (dry run) | | | | |")
                continue
            try:
                def fwd():
                    with torch.no_grad():
                        fn(*pick())

                def fwdbwd():
                    h, W, y = pick()
                    fn(h, W, y).sum().backward()
                    h.grad = W.grad = None
                tf, tb = bench(fwd), bench(fwdbwd)
                out(f"| {name} | {mname} | {tf:.2f} | {flops / tf / 1e9:.0f} | {tb:.2f} | "
                    f"{3 * flops / tb / 1e9:.0f} | {bytes_ / tb / 1e6:.0f} |")
            except Exception as exc:  # report, don't hide
                out(f"| {name} | {mname} | {_failed(exc)} | | | | |")
        _losses(name, pick, gemm3, bench, dev, dry, out)
    return 0


def _losses(name, pick, gemm3, bench, dev, dry, out):
    import alignkit
    out("")
    out(f"| {name} | loss, one pair | fwd+bwd ms | vs 3 GEMMs |")
    out("|---|---|---|---|")
    for loss in ("dpo", "orpo"):
        def ours(mode, loss=loss):
            def step():
                h, W, y = pick()
                kw = dict(ref_logprobs=torch.full((2,), -1e3, device=dev)) if loss == "dpo" else {}
                alignkit.preference_loss(h.view(2, -1, h.shape[-1]), W, y.view(2, -1), loss=loss,
                                         grad_mode=mode, backend="triton", **kw)[0].backward()
                h.grad = W.grad = None
            return step

        def liger(loss=loss):
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearORPOLoss
            fn = (LigerFusedLinearDPOLoss(use_ref_model=False) if loss == "dpo"
                  else LigerFusedLinearORPOLoss())

            def step():
                h, W, y = pick()
                fn(W, h.view(2, -1, h.shape[-1]), y.view(2, -1))[0].backward()
                h.grad = W.grad = None
            return step
        for label, make in ((f"alignkit {loss} recompute", lambda: ours("recompute")),
                            (f"alignkit {loss} single_pass", lambda: ours("single_pass")),
                            (f"Liger fused {loss}", liger)):
            if dry and label.startswith("Liger"):
                out(f"| {name} | {label} | skipped (dry run) | |")
                continue
            try:
                t = bench(make())
                out(f"| {name} | {label} | {t:.2f} | {t / gemm3:.2f}x |")
            except Exception as exc:  # report, don't hide
                out(f"| {name} | {label} | {_failed(exc)} | |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=None, choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--dry", action="store_true")
    a = p.parse_args(argv)
    shapes = a.shapes or (["dry"] if a.dry else ["llama3-8b", "qwen2.5-7b"])
    tokens = a.tokens or (64 if a.dry else 8192)
    return run(shapes, tokens, "fp32" if a.dry else a.dtype, a.dry)


if __name__ == "__main__":
    sys.exit(main())
