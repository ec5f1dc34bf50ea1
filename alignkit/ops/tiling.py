"""Tile sizes from a memory budget.

The cpp backend never holds more than one logits tile: ``rows x vocab_block`` fp32, plus the
gathered hidden rows of the chunk and their gradient (``rows x H`` fp32 each). So with a budget of
B bytes

    rows = B // (4 * (live_tiles * vocab_block + 2 * H))

with live_tiles = 1 for cpp. The torch fallback's elementwise ops make up to 6 tile-sized
temporaries at once (z, z − m, exp, products), so it plans with live_tiles = 6 and stays inside
the same budget.

The default budget is 16 MiB. Measured on a 2-core AMD EPYC (2 MiB L2/core, 32 MiB L3), fp32, the
four GEMMs of a fwd+bwd were fastest with vocab blocks of 2048 columns and 512-1024 token rows
(1.14-1.30x the untiled three-GEMM floor, against 1.5x for 256 rows): a 2048-column fp32 row (8 KiB)
stays in L1 for the kernel's two passes, and the tile stays in L2/L3 between the GEMM that writes
it and the kernel that reads it. At H=1024 the default gives 1024 rows; at H=256, 1638.

Override with the environment variable ALIGNKIT_TILE_BYTES (bytes), or ALIGNKIT_VOCAB_BLOCK.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_TILE_BYTES = 16 * 2**20
DEFAULT_VOCAB_BLOCK = 2048
MIN_ROWS = 16


@dataclass(frozen=True)
class TilePlan:
    rows: int          # tokens per chunk
    vocab_block: int   # vocab columns per tile
    budget: int        # bytes the plan was derived from


def tile_bytes() -> int:
    return int(os.environ.get("ALIGNKIT_TILE_BYTES", DEFAULT_TILE_BYTES))


def plan(n_tokens: int, hidden: int, vocab: int, budget: int | None = None,
         live_tiles: float = 1) -> TilePlan:
    budget = tile_bytes() if budget is None else int(budget)
    if budget <= 0:
        raise ValueError(f"tile budget must be > 0 bytes, got {budget}")
    vb = int(os.environ.get("ALIGNKIT_VOCAB_BLOCK", DEFAULT_VOCAB_BLOCK))
    # A vocab that fits in two blocks is taken whole: one GEMM per chunk, no online merge.
    vb = vocab if vocab <= 2 * vb else vb
    rows = int(budget // (4 * (live_tiles * vb + 2 * hidden)))
    rows = max(MIN_ROWS, min(rows, max(n_tokens, 1)))
    return TilePlan(rows=rows, vocab_block=vb, budget=budget)


def row_plan(n_rows: int, vocab: int, budget: int | None = None, live_tiles: int = 1) -> int:
    """Rows per chunk when the logits are given: live_tiles fp32 [rows, V] working tiles."""
    budget = tile_bytes() if budget is None else int(budget)
    return max(1, min(max(n_rows, 1), budget // (4 * live_tiles * vocab)))
