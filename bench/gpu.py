"""GPU bench mode (needs a CUDA device; exits with a message otherwise).

    python -m bench.gpu [--shapes llama3-8b qwen2.5-7b] [--tokens 8192] [--dtype bf16]

Per shape, fwd and fwd+bwd of per-token log-probs from hidden states, timed with
triton.testing.do_bench (median, after its warm-up) over a rotation of 4 input sets so that no
run reads another's cache. Reports ms, TFLOP/s (on the GEMM FLOPs the method must do: 2·N·H·V
forward, 3x that for fwd+bwd) and GB/s on the minimum bytes (h, W read once; grads written once),
side by side for: alignkit (triton backend), TRL's ChunkedLogProbFunction (its Triton kernel),
Liger's fused linear cross-entropy, Apple's cut-cross-entropy (impl="cce"), torch's chunked
F.linear_cross_entropy, and the cuBLAS GEMM of the same FLOPs.

Then the fused losses (one pair of N/2 + N/2 tokens, DPO and ORPO) fwd+bwd:
preference_loss with grad_mode="recompute" and "single_pass" (backend="triton": the cuBLAS tile
GEMMs and the logits kernels on the tile), against Liger's fused DPO / ORPO and the 3 cuBLAS GEMMs.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

SHAPES = {"llama3-8b": (4096, 128256), "qwen2.5-7b": (3584, 152064)}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu needs a CUDA device; on CPU use bench.core / bench.losses.")
        return 0
    from triton.testing import do_bench
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    print(f"device: {torch.cuda.get_device_name()}, dtype {a.dtype}, N={a.tokens}")
    print("| shape | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|---|")
    for name in a.shapes:
        H, V = SHAPES[name]
        N = a.tokens
        sets = [(torch.randn(N, H, device="cuda", dtype=dt, requires_grad=True),
                 (torch.randn(V, H, device="cuda", dtype=dt) / H**0.5).requires_grad_(),
                 torch.randint(0, V, (N,), device="cuda")) for _ in range(4)]
        flops = 2 * N * H * V
        bytes_ = (N * H + V * H) * dt.itemsize * 2  # read h, W; write grad_h, grad_W
        it = iter(range(10**9))

        def pick():
            return sets[next(it) % len(sets)]
        Gs = [torch.randn(N, V, device="cuda", dtype=dt) for _ in range(1)]
        gemm = do_bench(lambda: (lambda h, W, y: h @ W.t())(*pick()))
        gemm3 = do_bench(lambda: (lambda h, W, y: (h @ W.t(), Gs[0] @ W, Gs[0].t() @ h))(*pick()))
        print(f"| {name} | cuBLAS GEMM (1 / 3 GEMMs) | {gemm:.2f} | {flops / gemm / 1e9:.0f} | "
              f"{gemm3:.2f} | {3 * flops / gemm3 / 1e9:.0f} | |")
        for mname, fn in _methods().items():
            try:
                def fwd():
                    with torch.no_grad():
                        fn(*pick())

                def fwdbwd():
                    h, W, y = pick()
                    fn(h, W, y).sum().backward()
                    h.grad = W.grad = None
                tf, tb = do_bench(fwd), do_bench(fwdbwd)
                print(f"| {name} | {mname} | {tf:.2f} | {flops / tf / 1e9:.0f} | {tb:.2f} | "
                      f"{3 * flops / tb / 1e9:.0f} | {bytes_ / tb / 1e6:.0f} |")
            except Exception as exc:  # report, don't hide
                print(f"| {name} | {mname} | failed: {type(exc).__name__}: {exc} | | | | |")
        _losses(name, sets, pick, gemm3, flops, do_bench)
    return 0


def _losses(name, sets, pick, gemm3, flops, do_bench):
    import alignkit
    print(f"\n| {name} | loss, one pair | fwd+bwd ms | vs 3 cuBLAS GEMMs |\n|---|---|---|---|")
    for loss in ("dpo", "orpo"):
        def ours(mode, loss=loss):
            def step():
                h, W, y = pick()
                kw = dict(ref_logprobs=torch.full((2,), -1e3, device="cuda")) if loss == "dpo" else {}
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
        for label, step in ((f"alignkit {loss} recompute", ours("recompute")),
                            (f"alignkit {loss} single_pass", ours("single_pass")),
                            (f"Liger fused {loss}", liger())):
            try:
                t = do_bench(step)
                print(f"| {name} | {label} | {t:.2f} | {t / gemm3:.2f}x |")
            except Exception as exc:  # report, don't hide
                print(f"| {name} | {label} | failed: {type(exc).__name__}: {exc} | |")


if __name__ == "__main__":
    sys.exit(main())
