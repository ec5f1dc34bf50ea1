"""GEMMs with fp32 output and accumulation, whatever the operands' dtype: the one place the
head's paths (the op's backward, the triton chunked backward, the single pass's tiles) choose
how. fp32 operands: a plain GEMM. bf16/fp16 on CUDA: the vendor GEMM with out_dtype=float32
(tensor cores, fp32 accumulation and output). bf16/fp16 on CPU (the interpreter's tests): torch's
CPU GEMM has no fp32-output low-precision form, so the operands are upcast (the same fp32
accumulation).

first (addmm32): the accumulator is written, not added to (beta = 0). A [V, H] grad_W that its
first GEMM writes needs no zero fill up front: a pass over the largest gradient for nothing
(32 MiB, ~6 ms at V=32000, H=256; bench/RESULTS.md).
"""
from __future__ import annotations

import torch


def mm32(a, b, out=None):
    """a·b as fp32 (into out when given)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, out=out) if out is not None else a @ b
    if a.is_cuda:
        if out is not None:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float(), out=out) if out is not None else a.float() @ b.float()


def addmm32(acc, a, b, first=False):
    """acc (fp32) += a·b, as mm32; first: acc = a·b (acc's old contents neither read nor
    needed, so it need not have been zeroed)."""
    if first:
        mm32(a, b, out=acc)
    elif a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())
