"""What a GPU architecture lets one Triton block use, and what a schedule asks of it.

Used before launch (triton_path refuses an opt-in backward mode whose block cannot fit; the
autotuner's configs are pruned with `prune_configs`) and by `bench.gpu_compile`, which compiles
every kernel for each architecture below and checks these estimates against the cubins.

ARCHS: per-SM limits of the data sheets (CUDA C Programming Guide, "Compute capabilities"):
  smem_block  the most shared memory one block may opt into (dynamic + static);
  smem_sm     shared memory per SM (each resident block also takes RESERVED_SMEM of it);
  regs_sm     32-bit registers per SM, allocated per warp in units of REG_UNIT;
  threads_sm, blocks_sm  resident threads / blocks per SM.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    capability: int        # Triton's GPUTarget arch: 80, 90 (compiled as sm_90a), 100 (sm_100a)
    card: str
    smem_block: int
    smem_sm: int
    regs_sm: int = 65536
    threads_sm: int = 2048
    blocks_sm: int = 32


KIB = 1024
ARCHS = {
    "sm_80": Arch("sm_80", 80, "A100", smem_block=163 * KIB, smem_sm=164 * KIB),
    "sm_90a": Arch("sm_90a", 90, "H100", smem_block=227 * KIB, smem_sm=228 * KIB),
    "sm_100a": Arch("sm_100a", 100, "B200", smem_block=227 * KIB, smem_sm=228 * KIB),
}
RESERVED_SMEM = 1 * KIB   # per resident block, taken by the driver (sm_80 and later)
REG_UNIT = 256            # registers are allocated per warp in units of 256


def arch_of(capability: tuple[int, int] | int) -> Arch | None:
    """The table's entry for a device's compute capability ((9, 0) -> sm_90a); None if absent."""
    major = capability[0] if isinstance(capability, tuple) else capability // 10
    minor = capability[1] if isinstance(capability, tuple) else capability % 10
    return next((a for a in ARCHS.values() if a.capability == 10 * major + minor), None)


def blocks_per_sm(arch: Arch, regs: int, num_warps: int, shared: int) -> dict:
    """Resident blocks per SM and which limit binds: min over threads, registers (regs/thread,
    rounded up per warp to REG_UNIT), shared memory (+ RESERVED_SMEM per block) and the block cap.
    shared over the block limit: 0 blocks (it cannot launch)."""
    threads = arch.threads_sm // (32 * num_warps)
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = arch.regs_sm // (per_warp * num_warps)
    by_smem = arch.smem_sm // (shared + RESERVED_SMEM) if shared <= arch.smem_block else 0
    limits = {"threads": threads, "registers": by_regs, "shared": by_smem,
              "blocks": arch.blocks_sm}
    n = min(limits.values())
    return {"blocks": n, "limit": min(limits, key=limits.get), "warps": n * num_warps}


def pipeline_smem(block_n: int, block_v: int, block_k: int, num_stages: int, elem: int,
                  capability: int, mma: bool = True) -> int:
    """Shared memory of the tuned kernels' pipelined tile loop (_fwd_partials, _bwd_g_chunk):
    buffers of the [BLOCK_N, BLOCK_K] and [BLOCK_V, BLOCK_K] operand blocks, elem bytes each.
    Triton keeps num_stages buffers on sm_90 and later where the dot runs on tensor cores (mma:
    wgmma / tcgen05 read shared memory), num_stages - 1 where it does not (fp32 "ieee" products)
    and on sm_80 (cp.async); sm_90 and later add 1 KiB of barriers, and tcgen05 16 bytes. The
    epilogue's reduction scratch reuses the buffers. bench.gpu_compile checks this against every
    compiled config and fails where it is below the cubin's (the pruner would then keep a config
    that cannot launch)."""
    if capability < 90:
        return (num_stages - 1) * (block_n + block_v) * block_k * elem
    return (num_stages if mma else num_stages - 1) * (block_n + block_v) * block_k * elem + KIB \
        + (16 if capability >= 100 and mma else 0)


class DoesNotFit(RuntimeError):
    """A Triton kernel's block needs more shared memory than the device lets one block use."""


def device_arch(device) -> tuple[str, int, int]:
    """(name, capability, per-block shared memory limit) of a CUDA device, the limit as the
    driver reports it (ARCHS holds the same figures for the architectures compiled here)."""
    import torch
    p = torch.cuda.get_device_properties(device)
    a = arch_of((p.major, p.minor))
    name = f"{a.name if a else f'sm_{p.major}{p.minor}'} ({p.name})"
    return name, 10 * p.major + p.minor, p.shared_memory_per_block_optin


def check_fits(what: str, arch_name: str, need: int, limit: int) -> None:
    """Raises DoesNotFit, naming `what` and the architecture, when need > limit bytes."""
    if need > limit:
        raise DoesNotFit(
            f"{what} cannot run on {arch_name}: its block needs {need / KIB:.0f} KiB of shared "
            f"memory, over the {limit / KIB:.0f} KiB one block may use there. Use the default "
            f"backward mode (unset ALIGNKIT_TRITON_BWD) or smaller blocks "
            f"(ALIGNKIT_TRITON_BLOCKS); `make gpu-compile` lists what fits where.")


def fits_config(kw: dict, num_stages: int, elem: int, capability: int, limit: int,
                mma: bool = True) -> bool:
    """Whether an autotune config's pipelined loop (pipeline_smem) fits `limit` bytes."""
    return pipeline_smem(kw["BLOCK_N"], kw["BLOCK_V"], kw["BLOCK_K"], num_stages, elem,
                         capability, mma) <= limit


def prune_configs(configs, named_args, **kwargs):
    """The tuned kernels' `early_config_prune`: drops the configs whose pipelined loop does not
    fit the device's per-block shared memory, so the autotuner never tries one that cannot
    launch (Triton would compile it and fail it at launch). Operand size from h_ptr, whether the
    dot runs on tensor cores from the launch's PRECISION ("ieee": the CUDA cores)."""
    import torch
    h = named_args["h_ptr"]
    if not (isinstance(h, torch.Tensor) and h.device.type == "cuda"):
        return configs                          # the interpreter: nothing to fit
    name, cap, limit = device_arch(h.device)
    mma = kwargs.get("PRECISION", named_args.get("PRECISION")) != "ieee"
    keep = [c for c in configs if fits_config(c.kwargs, c.num_stages, h.element_size(), cap,
                                              limit, mma)]
    if not keep:
        raise DoesNotFit(f"no autotune config of alignkit.kernels fits {name}'s "
                         f"{limit / KIB:.0f} KiB of shared memory a block")
    return keep
