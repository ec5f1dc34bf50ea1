"""The single passes' memory budgets: how many token rows a full-vocabulary tile holds, how many
deferred G rows may be kept, and why a pass cannot serve a call. Which pass serves a call that can
take either is decided by measuring, in alignkit/ops/plan.py, not here.

Shapes: the head weight is [V, H]; a tile is [rows, V].
"""
from __future__ import annotations

import torch

from alignkit.ops.backends import gemm_dtype, resolve
from alignkit.ops.options import TileOptions
from alignkit.ops.vocab_shard import is_dtensor, is_vocab_parallel

def tile_rows(V: int, device=None, dtype: torch.dtype = torch.float32, tiles=None,
              H: int | None = None, backend: str = "auto") -> int:
    """Token rows per [rows, V] tile, from the bytes an element costs: the triton backend, the
    fp32 tile plus, for bf16, G's bf16 copy for the two GEMMs (6; fp16 forms G over the tile, 4);
    the CPU backends, the fp32 tile (4), or the bf16 logits where the GEMMs run in bf16 (2: G is
    formed a vocab block at a time beside it). The budget: TileOptions.gpu_chunk_bytes on CUDA
    (1 GiB: 1395 rows at V=128256 in bf16, 6 bytes an element), where the GEMMs that read the
    tile want thousands of rows (each tile's Gᵀ·h reads and writes all of grad_W);
    .single_pass_bytes on CPU (64 MiB; the interpreter's triton tiles too). H: the head's hidden
    size, for single_pass_bytes' default (TileOptions.resolved)."""
    t = (tiles or TileOptions()).resolved(head=(V, H) if H is not None else None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    budget = t.gpu_chunk_bytes if device.type == "cuda" else t.single_pass_bytes
    if device.type == "cuda" or resolve(backend, device) == "triton":
        per = 6 if dtype == torch.bfloat16 else 4      # fp16 keeps G in the fp32 tile
    else:
        per = 2 if gemm_dtype(dtype, device) != torch.float32 else 4
    return max(1, budget // (per * V))


def keep_rows(V: int, H: int, device=None, dtype: torch.dtype = torch.float32,
              tiles=None, backend: str = "auto") -> int:
    """Token rows of G the single pass may keep for sequences whose scalar is not known yet.
    Where G has the tile's dtype (fp32; bf16 GEMMs on CPU) the kept rows share one buffer with
    the tile, formed in place: (tile budget + keep_bytes) / (V x itemsize), so keep_bytes is all
    the memory keeping adds, and 0 still keeps what the tile's own memory holds. The triton
    backend's bf16 G is written beside its fp32 tile, into a [rows, V] buffer that the kept rows
    share (no tile's G is written while G is kept): tile rows + keep_bytes / 2V (VocabTiles
    allocates it so). On CUDA at H=4096, V=128256 that keeps 3787 rows where a buffer of their
    own kept 2392: an untied pair of 4096 + 4096 tokens forms 309 tokens twice instead of 1704
    (bench.paper: 1.12x the 3-GEMM floor instead of 1.18x), in the same memory.
    (TileOptions.keep_bytes; default 3/10 of grad_W.)"""
    t = (tiles or TileOptions()).resolved(head=(V, H))
    device = torch.device(device) if device is not None else torch.device("cpu")
    budget = t.gpu_chunk_bytes if device.type == "cuda" else t.single_pass_bytes
    if resolve(backend, device) == "triton":
        if dtype == torch.bfloat16:
            return tile_rows(V, device, dtype, tiles, H=H, backend=backend) + \
                t.keep_bytes // (2 * V)
        return (budget + t.keep_bytes) // (4 * V)
    per = 2 if gemm_dtype(dtype, device) != torch.float32 else 4
    return (budget + t.keep_bytes) // (per * V)


GRAD_MODES = ("recompute", "single_pass", "auto")


def pass_blocker(hidden, weight, bias, grad_mode: str, tiles=None):
    """Why a single pass (the pair pass or the token pass) cannot serve a call, or, under
    grad_mode "auto", should not; None where it can. Both front doors (preference_loss,
    policy_loss) ask this one function. tiles: the call's TileOptions (its vocab_group)."""
    if is_vocab_parallel(weight, tiles) or is_dtensor(bias):
        return VOCAB_PARALLEL
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if len(dtypes) != 1:
        return f"hidden, weight and bias must share one dtype, got {sorted(map(str, dtypes))}"
    if dtypes == {torch.float64}:
        return "float64 inputs take the recompute (its GEMMs run in fp32 either way)"
    # no gradient wanted (no_grad, or nothing requires one): the recompute op runs forward only,
    # one GEMM per tile and no [V, H] accumulator
    if grad_mode == "auto" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return NO_GRAD
    return None


# a head split over the vocabulary across ranks: the single passes form G from full-vocabulary
# tiles, which no rank holds; the recompute plan's op merges the shards' statistics
# (alignkit/ops/vocab_parallel.py), so the chooser's one candidate is the sharded recompute
VOCAB_PARALLEL = ("a vocab-parallel head (split over ranks) takes the recompute plan: the single "
                  "passes need full-vocabulary tiles")

# pass_blocker's reason under grad_mode "auto" (a plan pinned by TileOptions.plan included): not an
# error, the recompute's forward is the whole work
NO_GRAD = "no input requires a gradient"


LONG_TILE_ROWS = 192


def long_tiles(weight, tiles=None) -> bool:
    """Whether full-vocabulary tiles hold the >= 192 rows where the single pass's GEMMs ran at
    speed (bench/HISTORY.md, "Single pass or recompute"); on CPU only in fp32, where the pass's
    fp32 [V, H] accumulator is not twice a bf16 grad_W. torch.compile's fixed rule (a compiled
    graph cannot time candidates); eager calls measure (alignkit/ops/plan.py)."""
    if weight.device.type != "cuda" and weight.dtype != torch.float32:
        return False
    return tile_rows(weight.shape[0], weight.device, weight.dtype, tiles,
                     H=weight.shape[1]) >= LONG_TILE_ROWS


def check_grad_mode(grad_mode):
    """grad_mode's one check (the front doors, the trainer's config): one of GRAD_MODES."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {', '.join(GRAD_MODES)}; got {grad_mode!r}")


def effective_mode(grad_mode: str, tiles: TileOptions) -> str:
    """grad_mode with TileOptions.plan folded in: a pinned plan implies "recompute" or
    "single_pass"; a grad_mode other than "auto" that contradicts it raises, naming both."""
    check_grad_mode(grad_mode)
    plan = tiles.resolved().plan
    if plan is None:
        return grad_mode
    implied = "recompute" if plan == "recompute" else "single_pass"
    if grad_mode not in ("auto", implied):
        raise ValueError(f"grad_mode={grad_mode!r} contradicts plan={plan!r} (tiles.plan or "
                         "ALIGNKIT_PLAN): give one of them")
    return implied


def pinned_plan(mode: str, t: TileOptions):
    """The plan a call is pinned to (t: resolved options), or None where the chooser decides."""
    if t.plan is not None:
        return t.plan
    return mode if mode in ("recompute", "single_pass") else None
