"""Launchers of the Triton kernels (alignkit.kernels) for the linear and logits log-prob ops.

Called by alignkit.ops.linear_logprobs / logits_logprobs when the backend is "triton": on CUDA
tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI checks the kernels' exactness).
The schedule (tiles, grouping, warps, stages) is fixed per device, dtype and direction
(Schedule; opt-in autotuning over AUTOTUNE_CONFIGS, pruned by shared memory). Backward modes (TileOptions.triton_bwd): "chunked"
(default: G per row chunk + two vendor GEMMs, deterministic), "atomic", "blocked" (see
alignkit.kernels). The G chunk holds TileOptions.gpu_chunk_bytes (1 GiB default) of rows on CUDA,
and the CPU tile budget (tile_bytes, 16 MiB) under the interpreter. Inputs here are already
validated and restricted to the labelled tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from alignkit.ops.env import env as alignkit_env
from alignkit.ops.gemm32 import addmm32, mm32


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How the fused kernels tile the work: a BLOCK_N x BLOCK_V logits tile per program, H walked
    in BLOCK_K steps, programs grouped GROUP_V vocab blocks at a time (kernels._tile_index), and
    the launch's warps and software-pipeline stages."""
    block_n: int
    block_v: int
    block_k: int
    group_v: int = 8
    num_warps: int = 4
    num_stages: int = 3


# On a card, bf16/fp16: 128 x 128 x 64 tiles, 8 warps, 3 stages, W grouped 8 vocab blocks at a
# time. Sized by what the kernels compile to (bench.gpu_compile, issue #34): the epilogue's
# elementwise temporaries are tile-sized fp32 too, so a thread can hold 64 tile elements
# (BLOCK_N x BLOCK_V / (32 x num_warps)) and stay under the 255-register ceiling;
# 128 x 256 at 8 warps (128 a thread, the previous default and CCE's H100 tile) spilled up to 1.6
# KiB a thread on sm_90a and sm_80. Shared memory: (128 + 128) x 64 x 2 bytes = 32 KiB a stage,
# 96 KiB for 3 (163 KiB a block on an A100, 227 on an H100). BLOCK_V = 128 doubles the forward's
# partials against 256 (4 x 4 bytes x M x V/BLOCK_V: 131 MB at 8192 tokens, V=128256).
CUDA_LOWP = Schedule(128, 128, 64, group_v=8, num_warps=8, num_stages=3)
# The backward's tile (_bwd_g_chunk and the opt-in modes) also forms p, the one-hot and the
# entropy term: at 128 x 128 over 8 warps it sat at 255 registers and spilled in fp16 with
# bias, softcap and entropy (8 B of stack on sm_90a, 64 B on sm_80). 128 x 64 (32 a thread):
# 128-182 registers, 48 KiB of shared memory (sm_80) / 73 KiB (sm_90a).
CUDA_LOWP_BWD = Schedule(128, 64, 64, group_v=8, num_warps=8, num_stages=3)
# fp32 operands (ieee products run on the CUDA cores; tf32 on tensor cores): 64 x 128 x 32 over 8
# warps (32 tile elements a thread); at 4 warps the ieee backward with bias, softcap and entropy
# spilled on sm_90a (255 registers, 40 B of stack).
CUDA_FP32 = Schedule(64, 128, 32, group_v=8, num_warps=8, num_stages=3)
# the interpreter (numpy, one program at a time): the blocks that kept the CPU test run short.
INTERPRETER = Schedule(64, 128, 64, group_v=8)
# the merge reads [MERGE_B, MERGE_N] partials per statistic and step
MERGE_N, MERGE_B = 64, 32
LOGITS_BLOCK_V = 1024


def schedule(h, backward: bool = False) -> Schedule:
    """The launch schedule for hidden rows `h` (its device and dtype), of the forward or the
    backward. ALIGNKIT_TRITON_BLOCKS="n,v,k" or "n,v,k,group" overrides the blocks of both (the
    tests use small ones)."""
    base = (INTERPRETER if h.device.type != "cuda" else
            CUDA_FP32 if h.dtype == torch.float32 else
            CUDA_LOWP_BWD if backward else CUDA_LOWP)
    env = alignkit_env("ALIGNKIT_TRITON_BLOCKS")
    if not env:
        return base
    v = [int(x) for x in env.split(",")]
    return dataclasses.replace(base, block_n=v[0], block_v=v[1], block_k=v[2],
                               group_v=v[3] if len(v) > 3 else base.group_v)


def precision(h) -> str:
    """The kernels' dot input precision (their PRECISION): bf16/fp16 on a card multiply on the
    tensor cores as they are ("native"); fp32 follows torch.get_float32_matmul_precision(), as
    torch's own matmuls do: "highest" (torch's default) gives exact "ieee" products, "high" and
    "medium" allow "tf32". Under the interpreter low-precision operands are upcast (numpy has no
    bf16 dot), exactly."""
    if h.dtype != torch.float32:
        return "native" if h.device.type == "cuda" else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def m_bucket(M: int) -> int:
    """M rounded up to a power of two: the autotuner's key (kernels.AUTOTUNE_CONFIGS)."""
    return 1 << max(0, (M - 1).bit_length())


def _launch(sch: Schedule, H: int, grouped: bool = True) -> dict:
    """A kernel's schedule arguments for hidden size H; grouped: with GROUP_V (the kernels on the
    grouped 1-D grid, kernels._tile_index; _bwd_dh / _bwd_dw index their own 2-D grids)."""
    d = dict(BLOCK_N=sch.block_n, BLOCK_V=sch.block_v, BLOCK_K=sch.block_k,
             EVEN_K=H % sch.block_k == 0, num_warps=sch.num_warps, num_stages=sch.num_stages)
    return dict(d, GROUP_V=sch.group_v) if grouped else d


def on_device(fn):
    """Runs a launcher with its first tensor's CUDA device current: Triton launches on the current
    device, so tensors on cuda:1 while cuda:0 is current (device_map="auto") would be read with
    the wrong device's pointers."""
    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        guard = torch.cuda.device(x.device) if x.device.type == "cuda" else \
            contextlib.nullcontext()
        with guard:
            return fn(x, *args, **kwargs)
    return run


def autotune() -> bool:
    return alignkit_env("ALIGNKIT_TRITON_AUTOTUNE") == "1"


def _contig(b):
    # the kernels index bias[v] with stride 1: a strided view (bias[::2]) would read other values
    return b.contiguous() if b is not None else None


def _common_dtype(h, w):
    """One dtype for the kernels' operands. A bf16/fp16 head runs in its own dtype, whatever
    h's (as the CPU backends do, and as a transformers model feeds its lm_head): promoting would
    copy all of W to fp32 (2.1 GB at Llama-3-8B) and run the dots on the CUDA cores. Otherwise
    the promoted dtype, float64 as fp32."""
    if w.dtype in (torch.bfloat16, torch.float16):
        dt = w.dtype
    else:
        dt = torch.promote_types(h.dtype, w.dtype)
        dt = torch.float32 if dt == torch.float64 else dt
    return h.to(dt).contiguous(), w.to(dt).contiguous()


def g_chunk_rows(M: int, V: int, h, tiles) -> int:
    """Rows of G per chunk. On a GPU the chunk is sized for the GEMMs that read it
    (tiles.gpu_chunk_bytes, 1 GiB: 4185 rows at V=128256 in bf16), not for a CPU cache; elsewhere
    (the interpreter) the CPU tile budget (tiles.tile_bytes) applies."""
    from alignkit.ops import tiling
    if h.device.type != "cuda":
        return tiling.row_plan(M, V, tiles.tile_bytes)
    elem = h.element_size() if h.dtype != torch.float32 else 4
    return max(1, min(M, tiles.gpu_chunk_bytes // (elem * V)))


@on_device
def linear_forward(h, w, y, b, inv_temp, cap):
    """h [M, H] labelled rows, y [M] → (logprob, m, log s, entropy), each [M] fp32."""
    from alignkit.kernels import linear_logprobs as K
    h, w = _common_dtype(h, w)
    b = _contig(b)
    M, H = h.shape
    V = w.shape[0]
    sch = schedule(h)
    f32 = dict(dtype=torch.float32, device=h.device)
    args = (h, w, y, b if b is not None else h)
    tail = (M, V, H, m_bucket(M), h.stride(0), w.stride(0), inv_temp, cap if cap > 0 else 1.0)
    flags = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=cap > 0, PRECISION=precision(h))
    if autotune():
        # the partials' width depends on the BLOCK_V the tuner picks: size them for the
        # smallest configured BLOCK_V and let the merge read the first cdiv(V, BLOCK_V) rows
        bv_min = min(c.kwargs["BLOCK_V"] for c in K.AUTOTUNE_CONFIGS)
        parts = [torch.empty(triton_cdiv(V, bv_min), M, **f32) for _ in range(4)]
        K.fwd_partials_tuned[lambda meta: (triton_cdiv(M, meta["BLOCK_N"]) *
                                           triton_cdiv(V, meta["BLOCK_V"]),)](
            *args, *parts, *tail, **flags)
        nvb = triton_cdiv(V, K.fwd_partials_tuned.best_config.kwargs["BLOCK_V"])
    else:
        nvb = triton_cdiv(V, sch.block_v)
        parts = [torch.empty(nvb, M, **f32) for _ in range(4)]
        K._fwd_partials[(triton_cdiv(M, sch.block_n) * nvb,)](
            *args, *parts, *tail, **flags, **_launch(sch, H))
    outs = [torch.empty(M, **f32) for _ in range(4)]
    K._fwd_merge[(triton_cdiv(M, MERGE_N),)](*parts, *outs, M, nvb, BLOCK_N=MERGE_N,
                                             BLOCK_B=MERGE_B)
    return outs


@on_device
def linear_backward(h, w, y, b, m, logs, g, ent, ge, inv_temp, cap, need_h, need_w, need_b,
                    tiles):
    """→ (dh [M, H], dW [V, H], db [V]) fp32, None where not needed."""
    from alignkit.kernels.linear_logprobs import (_bwd_atomic, _bwd_dh, _bwd_dw, _bwd_g_chunk,
                                                  bwd_g_chunk_tuned)
    h, w = _common_dtype(h, w)
    b = _contig(b)
    M, H = h.shape
    V = w.shape[0]
    sch = schedule(h, backward=True)
    f32 = dict(dtype=torch.float32, device=h.device)
    mode = tiles.triton_bwd
    # the chunked mode's GEMMs write dh and, from the first chunk on, dw: no zero fill (the op
    # calls no backward without a labelled row; zeros all the same if M == 0); the atomic modes
    # add into zeros
    alloc = torch.empty if mode == "chunked" and M else torch.zeros
    dh = alloc(M, H, **f32) if need_h else None
    dw = alloc(V, H, **f32) if need_w else None
    db = torch.zeros(V, **f32) if need_b else None
    has_ent = ge is not None
    common = (h, w, y, b if b is not None else h, m, logs, g, ent if has_ent else g,
              ge if has_ent else g)
    flags = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=cap > 0, HAS_ENT=has_ent,
                 PRECISION=precision(h))
    grouped, blk = _launch(sch, H), _launch(sch, H, grouped=False)
    scal = (inv_temp, cap if cap > 0 else 1.0)
    if mode == "chunked":
        R = g_chunk_rows(M, V, h, tiles)
        # On a GPU with bf16 inputs G is stored in bf16 and the two GEMMs run on tensor cores with
        # fp32 outputs (out_dtype); otherwise everything is fp32 (W converted once). Not fp16:
        # G = g·(onehot − p), g the upstream gradient per token (1/N of an averaged loss), and at
        # V=128k g·p is below fp16's smallest subnormal (6e-8) for most of the tail, which would
        # flush to zero (grad_h then loses Σ p·W: tests/test_triton_interpreter.py, fp16 tail);
        # bf16 has fp32's exponent range.
        lowp = h.device.type == "cuda" and h.dtype == torch.bfloat16
        G_all = torch.empty(min(R, M) * V, dtype=h.dtype if lowp else torch.float32,
                            device=h.device)
        wc = w if lowp or w.dtype == torch.float32 else w.float()
        for r0 in range(0, M, R):
            r1 = min(M, r0 + R)
            G = G_all[: (r1 - r0) * V].view(r1 - r0, V)
            sl = lambda t: t[r0:r1] if t is not None else None  # noqa: E731
            args = (h[r0:r1], w, y[r0:r1], b if b is not None else h, m[r0:r1], logs[r0:r1],
                    g[r0:r1], sl(ent) if has_ent else g[r0:r1], sl(ge) if has_ent else g[r0:r1])
            n = r1 - r0
            tail = (G, n, V, H, m_bucket(n), h.stride(0), w.stride(0), G.stride(0), *scal)
            if autotune():
                bwd_g_chunk_tuned[lambda meta, n=n: (triton_cdiv(n, meta["BLOCK_N"]) *
                                                     triton_cdiv(V, meta["BLOCK_V"]),)](
                    *args, *tail, **flags)
            else:
                _bwd_g_chunk[(triton_cdiv(n, sch.block_n) * triton_cdiv(V, sch.block_v),)](
                    *args, *tail, **flags, **grouped)
            hc = h[r0:r1] if lowp or h.dtype == torch.float32 else h[r0:r1].float()
            if need_h:
                mm32(G, wc, out=dh[r0:r1])
            if need_w:
                addmm32(dw, G.t(), hc, first=r0 == 0)
            if need_b:
                db += G.sum(0, dtype=torch.float32)
        return dh, dw, db
    dummy = torch.empty(1, **f32)
    if mode == "atomic":
        launches = [(_bwd_atomic, (triton_cdiv(M, sch.block_n) * triton_cdiv(V, sch.block_v),),
                     (*common, dh if need_h else dummy, dw if need_w else dummy,
                      db if need_b else dummy, M, V, H, h.stride(0), w.stride(0), *scal),
                     dict(flags, NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, **grouped))]
    else:
        launches = ([(_bwd_dh, (triton_cdiv(M, sch.block_n), triton_cdiv(H, sch.block_k)),
                      (*common, dh, M, V, H, h.stride(0), w.stride(0), *scal),
                      dict(flags, **blk))] if need_h else []) + \
                   ([(_bwd_dw, (triton_cdiv(V, sch.block_v), triton_cdiv(H, sch.block_k)),
                      (*common, dw if need_w else torch.empty(V, H, **f32),
                       db if need_b else dummy, M, V, H, h.stride(0), w.stride(0), *scal),
                      dict(flags, NEED_B=need_b, **blk))] if need_w or need_b else [])
    if h.device.type == "cuda":
        for kernel, grid, args, kw in launches:
            refuse_unfit(f"ALIGNKIT_TRITON_BWD={mode}", kernel, grid, args, kw, h)
    for kernel, grid, args, kw in launches:
        kernel[grid](*args, **kw)
    return dh, dw, db


def refuse_unfit(what, kernel, grid, args, kw, h):
    """Compiles `kernel` for this launch (kernel.warmup: Triton's own specialisation and cache,
    which the launch then reuses; nothing runs) and raises gpu_limits.DoesNotFit, naming `what`
    and the card's architecture, when its block needs more shared memory than the card allows
    one block: the opt-in modes' second loop keeps more tiles in shared memory than the default
    path (bench.gpu_compile lists where each fits). Without this Triton would fail at launch
    with an OutOfResources that names neither."""
    from alignkit.ops.gpu_limits import check_fits, device_arch
    name, _, limit = device_arch(h.device)
    compiled = kernel.warmup(*args, grid=grid, **kw)
    check_fits(f"{what} ({kernel.__name__}, {h.dtype}, blocks {kw['BLOCK_N']}x{kw['BLOCK_V']}"
               f"x{kw['BLOCK_K']}, {kw['num_stages']} stages)", name, compiled.metadata.shared,
               limit)


@on_device
def logits_forward(x, y, inv_temp, ignore_index, cap=0.0):
    """x [N, V] logits, y [N] → (logprob, m, log s, entropy), each [N] fp32."""
    from alignkit.kernels.logits_logprobs import _logits_fwd
    N, V = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    outs = [torch.empty(N, **f32) for _ in range(4)]
    if N:
        _logits_fwd[(N,)](x, y, *outs, N, V, x.stride(0), inv_temp, cap if cap > 0 else 1.0,
                          ignore_index, HAS_SOFTCAP=cap > 0, BLOCK_V=LOGITS_BLOCK_V)
    return outs


@on_device
def logits_backward(x, out, y, m, logs, g, ent, ge, inv_temp, cap=0.0):
    from alignkit.kernels.logits_logprobs import _logits_bwd
    N, V = x.shape
    has_ent = ge is not None
    if N:
        _logits_bwd[(N,)](x, out, y, m, logs, g, ent if has_ent else g, ge if has_ent else g,
                          N, V, x.stride(0), out.stride(0), inv_temp, cap if cap > 0 else 1.0,
                          HAS_SOFTCAP=cap > 0, HAS_ENT=has_ent, BLOCK_V=LOGITS_BLOCK_V)
    return out


def triton_cdiv(a, b):
    return (a + b - 1) // b
