"""The Triton kernels compiled for real GPUs, on a machine without one: ``make gpu-compile``.

    python -m bench.gpu_compile [--out bench/out] [--arch sm_80 ...] [--jobs 2] [--all]
                                [--only default opt-in autotune] [--kernel _fwd_merge ...]

Every kernel in alignkit/kernels is compiled ahead of time (``triton.compile`` on this CPU, with
the ptxas bundled in the triton wheel) for each architecture of alignkit.ops.gpu_limits.ARCHS
that the bundled ptxas supports (sm_80, sm_90a, sm_100a), at the schedules its launcher
(alignkit/ops/triton_path.py, whose schedule() is asked) can pick:
  default   the CUDA schedules (CUDA_LOWP forward / CUDA_LOWP_BWD backward for bf16 and fp16,
            CUDA_FP32 for fp32 with "ieee" and "tf32" products), each kernel of the default path
            (_fwd_partials, _fwd_merge, _bwd_g_chunk, _logits_fwd, _logits_bwd) plain and with
            every constexpr flag its launcher sets (bias, softcap, entropy);
  opt-in    the atomic and blocked backward modes (_bwd_atomic, _bwd_dh, _bwd_dw) at the
            backward's schedule, all flags on: listed as refused where their block is over the
            architecture's shared memory (triton_path.refuse_unfit refuses it there);
  autotune  the configs of kernels.AUTOTUNE_CONFIGS, pruned ones included: a config over the
            limit must be one the pruner (gpu_limits.prune_configs) drops.
Which of these CI compiles (``jobs``; 75 compiles, 110-140 s of CPU) and what ``--all`` adds
(183) is in jobs' docstring. The compiles run in a pool of --jobs processes (2: CI's cores) with a
fresh Triton cache in a temporary folder, removed at the end: nothing is reused across runs.

Launch-time specialisation. A launch specialises a kernel on its arguments (Triton's
native_specialize_impl): a pointer 16-byte aligned, or an integer divisible by 16, gets
tt.divisibility=16 (vectorised, unmasked-stride loads), an integer equal to 1 becomes a constant.
Here the kernel's own binder (the JIT's create_function_from_signature, what ``fn[grid](...)``
calls) runs on the arguments of a representative launch, so the signature, constants and
attributes are the ones a real launch at that shape produces: Llama-3-8B's head (H=4096,
V=128256, both divisible by 16, so are the strides H and V), an odd labelled-row count M=8191
(not divisible: the general case), pointers from torch's allocator (16-byte aligned). The
chunked backward's later chunks pass row slices (y[r0:]) at any offset: that variant, with the
row pointers unaligned, is compiled too ("chunk>0").

From each cubin (the bundled cuobjdump): registers, stack, local and static shared memory
(--dump-resource-usage), Triton's dynamic shared memory (the kernel's metadata), the SASS
opcodes (-sass): the matrix instruction class (UTCMMA = tcgen05 on sm_100a, HGMMA = wgmma,
HMMA = mma.sync, else FFMA), the async loads (LDGSTS = cp.async, UTMALDG = TMA). Blocks per SM
follow gpu_limits.blocks_per_sm. Writes bench/out/gpu-compile.json and .md; exits 1 on any
failure (FAILURES below).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from alignkit.ops.gpu_limits import ARCHS, blocks_per_sm, pipeline_smem

DEFAULT_PATH = ("_fwd_partials", "_fwd_merge", "_bwd_g_chunk", "_logits_fwd", "_logits_bwd")
TUNED = ("_fwd_partials", "_bwd_g_chunk")    # the autotuned kernels: pipeline_smem, the pruner
GEMM = ("_fwd_partials", "_bwd_g_chunk", "_bwd_atomic", "_bwd_dh", "_bwd_dw")
OPT_IN = {"_bwd_atomic": "atomic", "_bwd_dh": "blocked", "_bwd_dw": "blocked"}
TENSOR_CORE = {"sm_80": ("HMMA",), "sm_90a": ("HGMMA",), "sm_100a": ("UTCMMA", "HGMMA", "HMMA")}
TARGETS = ("sm_80", "sm_90a")   # every variant, opt-in mode and autotune config; sm_100a: defaults
M, V, H = 8191, 128256, 4096
FAILURES = """A row fails when: it does not compile; its block's shared memory is over the
architecture's per-block limit and the launcher can pick it there (a default schedule, a config
the pruner keeps, an opt-in mode the launcher does not refuse on that architecture); a kernel of
the default path spills (stack or local memory > 0); a bf16 / fp16 GEMM kernel has no
tensor-core instruction of its architecture; the pruner's shared-memory estimate is below the
compiled kernel's (it would keep a config that cannot launch)."""


@dataclasses.dataclass(frozen=True)
class Job:
    kernel: str
    arch: str
    dtype: str                 # operand dtype: bf16, fp16, fp32
    precision: str             # the kernels' PRECISION: native, ieee, tf32
    role: str                  # default, opt-in, autotune
    sched: tuple               # (BLOCK_N, BLOCK_V, BLOCK_K, GROUP_V, num_warps, num_stages)
    variant: str = "plain"     # plain, flags (bias+softcap+entropy), chunk>0

    @property
    def key(self):
        return "|".join(map(str, dataclasses.astuple(self)))


def launcher_schedule(kernel: str, dtype: str) -> tuple:
    """The schedule triton_path.schedule picks on a card for this kernel and operand dtype, as
    (BLOCK_N, BLOCK_V, BLOCK_K, GROUP_V, num_warps, num_stages)."""
    import types
    import torch
    from alignkit.ops import triton_path as P
    h = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"),
                              dtype=getattr(torch, DTYPES[dtype]))
    s = P.schedule(h, backward=kernel not in FORWARD)
    return (s.block_n, s.block_v, s.block_k, s.group_v, s.num_warps, s.num_stages)


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FORWARD = ("_fwd_partials",)
PRECISIONS = (("bf16", "native"), ("fp16", "native"), ("fp32", "ieee"), ("fp32", "tf32"))


def jobs(archs, only=None, everything=False, kernels=None):
    """The (kernel, arch, dtype, schedule, variant) rows to compile. CI's set (the default): on
    sm_80 and sm_90a (TARGETS) every default-path kernel in bf16, fp16 and fp32 ("ieee"), plain
    and with every flag its launcher sets (bias, softcap, entropy), and "tf32" plain; the atomic
    backward (the opt-in mode with the most shared memory) in bf16; every autotune config of the
    forward in bf16 (the pruner's estimate in 4-byte operands is checked on the fp32 defaults).
    On sm_100a each default kernel plain, in bf16 and fp32. everything=True (--all) adds the
    blocked mode and the other dtypes' opt-in rows, every flag on sm_100a and with tf32, the
    chunk>0 specialisation, the tuned backward's configs and fp32 configs: about twice the
    compiles, and the fp32 FFMA ones that spill take ptxas 10-30 s each (over CI's 3 minutes on
    2 cores)."""
    from alignkit.kernels import linear_logprobs as K
    out = []
    for arch in archs:
        full = arch in TARGETS or everything
        for dt, prec in PRECISIONS:
            if not full and (dt, prec) not in (("bf16", "native"), ("fp32", "ieee")):
                continue
            flag_vars = ("plain", "flags") if full and (prec != "tf32" or everything) else \
                ("plain",)
            for k in ("_fwd_partials", "_bwd_g_chunk"):
                for var in flag_vars:
                    out.append(Job(k, arch, dt, prec, "default", launcher_schedule(k, dt), var))
            if prec == "tf32":
                continue
            if everything and dt == "bf16":
                out.append(Job("_bwd_g_chunk", arch, dt, prec, "default",
                               launcher_schedule("_bwd_g_chunk", dt), "chunk>0"))
            for k in ("_logits_fwd", "_logits_bwd"):
                for var in flag_vars:
                    out.append(Job(k, arch, dt, "-", "default", (), var))
            if full and (everything or dt == "bf16"):
                # tf32 is fp32's operand size: the same pipeline, the same shared memory
                for k in OPT_IN if everything else ("_bwd_atomic",):
                    out.append(Job(k, arch, dt, prec, "opt-in", launcher_schedule(k, dt),
                                   "flags"))
        out.append(Job("_fwd_merge", arch, "fp32", "-", "default", ()))
        if not full:
            continue
        for c in K.AUTOTUNE_CONFIGS:
            kw = c.kwargs
            s = (kw["BLOCK_N"], kw["BLOCK_V"], kw["BLOCK_K"], kw["GROUP_V"], c.num_warps,
                 c.num_stages)
            # the operand size is what the pruner reads: bf16 stands for fp16
            for dt, prec in (("bf16", "native"), ("fp32", "ieee"))[:2 if everything else 1]:
                for k in ("_fwd_partials", "_bwd_g_chunk") if everything else FORWARD:
                    out.append(Job(k, arch, dt, prec, "autotune", s))
    if only:
        out = [j for j in out if j.role in only]
    if kernels:
        out = [j for j in out if j.kernel in kernels]
    # duplicates (an autotune config equal to the default) compile once
    seen, uniq = set(), []
    for j in out:
        if (j.kernel, j.arch, j.dtype, j.precision, j.sched, j.variant) not in seen:
            seen.add((j.kernel, j.arch, j.dtype, j.precision, j.sched, j.variant))
            uniq.append(j)
    return uniq


class _Arg:
    """A tensor as the launch binder sees it: a dtype and a data pointer (its alignment)."""

    def __init__(self, dtype, ptr=0):
        self.dtype, self._ptr = dtype, ptr

    def data_ptr(self):
        return self._ptr


def _launch_args(job):
    """(positional args, constexpr kwargs) of the representative launch (module docstring)."""
    import torch
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[job.dtype]
    f32, i64 = torch.float32, torch.int64
    T = _Arg
    flags = job.variant == "flags"
    row = 8 if job.variant == "chunk>0" else 0      # y[r0:], g[r0:]... at an odd r0: 8-byte
    if job.kernel in ("_logits_fwd", "_logits_bwd"):
        from alignkit.ops.triton_path import LOGITS_BLOCK_V
        x = T(dt)
        if job.kernel == "_logits_fwd":
            return ((x, T(i64), T(f32), T(f32), T(f32), T(f32), M, V, V, 1.0, 2.0, -100),
                    dict(HAS_SOFTCAP=flags, BLOCK_V=LOGITS_BLOCK_V))
        return ((x, x, T(i64), T(f32), T(f32), T(f32), T(f32), T(f32), M, V, V, V, 1.0, 2.0),
                dict(HAS_SOFTCAP=flags, HAS_ENT=flags, BLOCK_V=LOGITS_BLOCK_V))
    if job.kernel == "_fwd_merge":
        from alignkit.ops.triton_path import MERGE_B, MERGE_N
        nvb = -(-V // launcher_schedule("_fwd_partials", "bf16")[1])
        return ((*[T(f32)] * 8, M, nvb), dict(BLOCK_N=MERGE_N, BLOCK_B=MERGE_B))
    bn, bv, bk, gv, _, _ = job.sched
    sched = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, EVEN_K=H % bk == 0, PRECISION=job.precision)
    fl = dict(HAS_BIAS=flags, HAS_SOFTCAP=flags)
    h, w, b = T(dt), T(dt), T(dt)
    stats = (T(i64, row), b, T(f32, 4 * row), T(f32, 4 * row), T(f32, 4 * row))
    ent = (T(f32, 4 * row), T(f32, 4 * row)) if flags else (stats[-1], stats[-1])
    scal = (1.0, 30.0 if flags else 1.0)
    if job.kernel == "_fwd_partials":
        return ((h, w, T(i64), b, *[T(f32)] * 4, M, V, H, 8192, H, H, *scal),
                dict(fl, **sched, GROUP_V=gv))
    if job.kernel == "_bwd_g_chunk":
        return ((h, w, *stats, *ent, T(dt if job.dtype == "bf16" else f32), M, V, H, 8192, H, H,
                 V, *scal), dict(fl, HAS_ENT=flags, **sched, GROUP_V=gv))
    if job.kernel == "_bwd_atomic":
        return ((h, w, *stats, *ent, T(f32), T(f32), T(f32), M, V, H, H, H, *scal),
                dict(fl, HAS_ENT=flags, NEED_H=True, NEED_W=True, NEED_B=flags, **sched,
                     GROUP_V=gv))
    if job.kernel == "_bwd_dh":
        return ((h, w, *stats, *ent, T(f32), M, V, H, H, H, *scal),
                dict(fl, HAS_ENT=flags, **sched))
    return ((h, w, *stats, *ent, T(f32), T(f32), M, V, H, H, H, *scal),
            dict(fl, HAS_ENT=flags, NEED_B=flags, **sched))


def _kernel_fn(name):
    mod = "logits_logprobs" if name.startswith("_logits") else "linear_logprobs"
    import importlib
    return getattr(importlib.import_module(f"alignkit.kernels.{mod}"), name)


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[A-Z0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def read_cubin(cubin: bytes) -> dict:
    """Registers, stack/local/static shared bytes and the opcode counts of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", "-sass", f.name],
                             capture_output=True, text=True, check=True).stdout
    regs, stack, shared, local = map(int, _RES.search(out).groups())
    ops = {}
    for op in _OPCODE.findall(out):
        ops[op] = ops.get(op, 0) + 1
    return dict(regs=regs, stack=stack, static_shared=shared, local=local, ops=ops)


def mma_class(ops: dict) -> str:
    """The matrix instruction a kernel's main loop runs on: tcgen05 (UTC*MMA), wgmma (HGMMA),
    mma.sync (HMMA), else the CUDA cores (FFMA)."""
    if any(o.startswith("UTC") and o.endswith("MMA") for o in ops):
        return "UTCMMA"
    for c in ("HGMMA", "HMMA"):
        if c in ops:
            return c
    return "FFMA"


def compile_one(job: Job) -> dict:
    """Compiles one job with the kernel's own launch binder; the row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    arch = ARCHS[job.arch]
    row = dict(dataclasses.asdict(job), key=job.key)
    t = time.time()
    try:
        fn = _kernel_fn(job.kernel)
        args, kw = _launch_args(job)
        if job.sched:
            kw.update(num_warps=job.sched[4], num_stages=job.sched[5])
        kw["debug"] = False
        target = GPUTarget("cuda", arch.capability, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kw)
        options, sig, consts, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                           options=options.__dict__)
        cub = read_cubin(k.asm["cubin"])
    except Exception as e:  # noqa: BLE001  (every compile error is a row of the report)
        row.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                   if str(e).strip() else type(e).__name__, seconds=round(time.time() - t, 1))
        return row
    warps = k.metadata.num_warps
    shared = k.metadata.shared + cub["static_shared"]
    occ = blocks_per_sm(arch, cub["regs"], warps, shared)
    ops = cub["ops"]
    row.update(
        regs=cub["regs"], stack=cub["stack"], local=cub["local"], shared=shared,
        num_warps=warps, blocks_per_sm=occ["blocks"], occupancy_limit=occ["limit"],
        mma=mma_class(ops), mma_count=sum(n for o, n in ops.items() if o.endswith("MMA")),
        async_loads="+".join(o for o in ("LDGSTS", "UTMALDG") if o in ops) or "-",
        spill_insts=ops.get("STL", 0) + ops.get("LDL", 0),
        seconds=round(time.time() - t, 1))
    if job.kernel in TUNED:
        bn, bv, bk, _, _, st = job.sched
        row["smem_estimate"] = pipeline_smem(bn, bv, bk, st, 4 if job.dtype == "fp32" else 2,
                                             arch.capability, mma=job.precision != "ieee")
    return row


def refused(row) -> bool:
    """Whether the launcher refuses this row's schedule on its architecture before launch: an
    opt-in mode whose compiled block is over the limit (triton_path.refuse_unfit compiles it and
    compares, exactly as here), an autotune config the pruner drops (its estimate is over).
    A default schedule is never refused."""
    limit = ARCHS[row["arch"]].smem_block
    if row["role"] == "opt-in":
        return row["shared"] > limit
    if row["role"] == "autotune":
        return (row.get("smem_estimate") or 0) > limit
    return False


def check(rows) -> list[str]:
    """The report's failures (FAILURES), one line each; empty when it passes."""
    bad = []
    for r in rows:
        name = f"{r['kernel']} {r['arch']} {r['dtype']}/{r['precision']} {r['role']} " \
               f"{r['variant']} {r['sched']}"
        if "error" in r:
            bad.append(f"{name}: does not compile: {r['error']}")
            continue
        limit = ARCHS[r["arch"]].smem_block
        if r["shared"] > limit and not refused(r):
            bad.append(f"{name}: {r['shared']} B of shared memory, over {r['arch']}'s {limit} B, "
                       f"and the launcher can pick it")
        if r.get("smem_estimate") is not None and r["smem_estimate"] < r["shared"]:
            bad.append(f"{name}: the pruner's estimate ({r['smem_estimate']} B) is below the "
                       f"compiled {r['shared']} B: it could keep a config that cannot launch")
        if r["role"] == "default" and r["kernel"] in DEFAULT_PATH and (r["stack"] or r["local"]):
            bad.append(f"{name}: spills ({r['stack']} B stack, {r['local']} B local)")
        if (r["kernel"] in GEMM and r["dtype"] in ("bf16", "fp16")
                and r["mma"] not in TENSOR_CORE[r["arch"]]):
            bad.append(f"{name}: no tensor-core instruction ({r['mma']}; expected "
                       f"{' or '.join(TENSOR_CORE[r['arch']])})")
    return bad


def supported_archs(archs):
    """The architectures the bundled ptxas can assemble for (ptxas --help lists them)."""
    out = []
    for a in archs:
        exe = _tool("ptxas" if ARCHS[a].capability < 90 else "ptxas-blackwell")
        if not os.path.exists(exe):
            exe = _tool("ptxas")
        helptext = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
        if a.replace("_", "_") in helptext or ARCHS[a].capability < 90:
            out.append(a)
    return out


def _sched(s):
    return f"{s[0]}×{s[1]}×{s[2]}, {s[4]}w, {s[5]}st" if s else "-"


def table(rows) -> list[str]:
    """The default path's markdown table: one line per kernel x arch x dtype; registers and
    stack plain / with every flag (bias, softcap, entropy) where both were compiled."""
    lines = ["| kernel | arch | dtype | schedule (N×V×K, warps, stages) | regs | stack B | "
             "shared KiB | blocks/SM (limit) | mma | async loads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    flags = {(r["kernel"], r["arch"], r["dtype"], r["precision"]): r for r in rows
             if r["role"] == "default" and r["variant"] == "flags"}
    for r in rows:
        if r["role"] != "default" or r["variant"] != "plain":
            continue
        s = r["sched"]
        dt = r["dtype"] + (f"/{r['precision']}" if r["dtype"] == "fp32" and s else "")
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['arch']} | {dt} | {_sched(s)} | error: "
                         f"{r['error'][:60]} ||||||")
            continue
        f = flags.get((r["kernel"], r["arch"], r["dtype"], r["precision"]))
        regs, stack = str(r["regs"]), str(r["stack"])
        if f and "error" not in f:
            regs, stack = f"{regs} / {f['regs']}", f"{stack} / {f['stack']}"
        lines.append(f"| {r['kernel']} | {r['arch']} | {dt} | {_sched(s)} | {regs} | {stack} | "
                     f"{r['shared'] / 1024:.0f} | {r['blocks_per_sm']} ({r['occupancy_limit']}) | "
                     f"{r['mma']} | {r['async_loads']} |")
    return lines


def choice_table(rows) -> list[str]:
    """The opt-in modes' and autotune configs' table, with whether the launcher may pick each."""
    lines = ["| kernel | role | arch | dtype | schedule | regs | stack B | shared KiB | "
             "blocks/SM | mma | launcher |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["role"] == "default":
            continue
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['role']} | {r['arch']} | {r['dtype']} | "
                         f"{_sched(r['sched'])} | error: {r['error'][:60]} ||||||")
            continue
        pick = ("refused (over shared memory)" if refused(r) else "may pick")
        lines.append(f"| {r['kernel']} | {r['role']} | {r['arch']} | {r['dtype']} | "
                     f"{_sched(r['sched'])} | {r['regs']} | {r['stack']} | "
                     f"{r['shared'] / 1024:.0f} | {r['blocks_per_sm']} | {r['mma']} | {pick} |")
    return lines


def _init_worker(cache):
    import warnings
    os.environ["TRITON_CACHE_DIR"] = cache
    # triton 3.9 warns that FP fusion's default will change; a launch today fuses, as here
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def run(archs, jobs_n=2, only=None, everything=False, kernels=None, log=print):
    """Compiles every job (a pool of jobs_n processes, a fresh Triton cache in a temporary folder:
    nothing is reused across runs) -> the report's rows, in job order."""
    todo = jobs(archs, only, everything, kernels)
    cache = tempfile.mkdtemp(prefix="alignkit-gpu-compile-")
    rows = {}
    try:
        ctx = __import__("multiprocessing").get_context("spawn")
        with cf.ProcessPoolExecutor(jobs_n, mp_context=ctx, initializer=_init_worker,
                                    initargs=(cache,)) as pool:
            # the GEMM kernels first (seconds each, against under one for the others): the two
            # workers finish together
            futs = {pool.submit(compile_one, j): j
                    for j in sorted(todo, key=lambda j: j.kernel not in GEMM)}
            for n, f in enumerate(cf.as_completed(futs), 1):
                r = f.result()
                rows[r["key"]] = r
                log(f"[{n}/{len(todo)}] {r['key']}: " + (r.get("error") or
                    f"{r['regs']} regs, {r['stack']} B stack, {r['shared']} B shared, {r['mma']}")
                    + f" ({r['seconds']} s)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return [rows[j.key] for j in todo]


def write(rows, failures, out_dir, seconds):
    os.makedirs(out_dir, exist_ok=True)
    import triton
    meta = dict(triton=triton.__version__, seconds=round(seconds, 1), failures=failures,
                shape=dict(M=M, V=V, H=H))
    with open(os.path.join(out_dir, "gpu-compile.json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    md = ["# Triton kernels compiled for sm_80 / sm_90a / sm_100a (no GPU)", "",
          f"triton {triton.__version__}, {len(rows)} compiles in {seconds:.0f} s; "
          f"{len(failures)} failures. Registers and stack: plain / with bias, softcap and entropy. "
          "Blocks per SM: gpu_limits.blocks_per_sm (which limit binds).", ""] + table(rows) + [
          "", "## Opt-in modes and autotune configs", ""] + choice_table(rows)
    if failures:
        md += ["", "## Failures", ""] + [f"- {x}" for x in failures]
    with open(os.path.join(out_dir, "gpu-compile.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--arch", nargs="*", default=list(ARCHS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="roles: default, opt-in, autotune")
    ap.add_argument("--kernel", nargs="*", help="only these kernels (e.g. _fwd_merge)")
    ap.add_argument("--all", action="store_true", help="every variant (jobs(everything=True))")
    a = ap.parse_args(argv)
    t = time.time()
    archs = supported_archs(a.arch)
    for x in set(a.arch) - set(archs):
        print(f"skipped {x}: the bundled ptxas does not support it")
    rows = run(archs, a.jobs, a.only, a.all, a.kernel, log=lambda s: print(s, flush=True))
    failures = check(rows)
    md = write(rows, failures, a.out, time.time() - t)
    print("\n".join(md))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
