"""Tile sizes from a memory budget.

The cpp backend never holds more than one logits tile: ``rows x vocab_block`` fp32, plus the
gathered hidden rows of the chunk and their gradient (``rows x H`` fp32 each). So with a budget of
B bytes

    rows = B // (4 * (live_tiles * vocab_block + 2 * H))

with live_tiles = 1 for cpp. The torch fallback's elementwise ops make up to 6 tile-sized
temporaries at once (z, z − m, exp, products), so it plans with live_tiles = 6 and stays inside
the same budget.

The default budget is 16 MiB. Measured on a 2-core CPU with 2 MiB L2/core (bench/RESULTS.md,
"Tile budget"), fp32, the four GEMMs of a fwd+bwd were fastest with vocab blocks of 2048 columns and 512-1024 token rows
(1.14-1.30x the untiled three-GEMM floor, against 1.5x for 256 rows): a 2048-column fp32 row (8 KiB)
stays in L1 for the kernel's two passes, and the tile stays in L2/L3 between the GEMM that writes
it and the kernel that reads it. At H=1024 the default gives 1024 rows; at H=256, 1638.

A big head changes the balance: each chunk of rows also reads and writes all of grad_W once
(V·H·4 bytes; in bf16 with a cast of G and an fp32 add), so at H=4096, V=128256 the 16 MiB
budget's 372-row chunks made backward 2.6x the GEMM floor in bf16. The default budget therefore
grows to 1/16 of grad_W where that is larger (TileOptions.resolved): 128 MiB there, ~2,900-row
chunks, 1.4-1.7x in bf16 and 1.13x in fp32 (bench/HISTORY.md, "Tile budget"). An explicit tile_bytes (argument or
ALIGNKIT_TILE_BYTES) is taken as given.

Set them per call with ``tiles=alignkit.TileOptions(tile_bytes=..., vocab_block=...)``; the
environment variables ALIGNKIT_TILE_BYTES and ALIGNKIT_VOCAB_BLOCK only change the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_ROWS = 16


@dataclass(frozen=True)
class TilePlan:
    rows: int          # tokens per chunk
    vocab_block: int   # vocab columns per tile
    budget: int        # bytes the plan was derived from


def plan(n_tokens: int, hidden: int, vocab: int, budget: int, vocab_block: int,
         live_tiles: float = 1) -> TilePlan:
    """budget and vocab_block: TileOptions.tile_bytes and .vocab_block, resolved."""
    if budget <= 0:
        raise ValueError(f"tile budget must be > 0 bytes, got {budget}")
    # A vocab that fits in two blocks is taken whole: one GEMM per chunk, no online merge.
    vb = vocab if vocab <= 2 * vocab_block else vocab_block
    rows = int(budget // (4 * (live_tiles * vb + 2 * hidden)))
    rows = max(MIN_ROWS, min(rows, max(n_tokens, 1)))
    return TilePlan(rows=rows, vocab_block=vb, budget=budget)


def row_plan(n_rows: int, vocab: int, budget: int, live_tiles: int = 1) -> int:
    """Rows per chunk when the logits are given: live_tiles fp32 [rows, V] working tiles."""
    return max(1, min(max(n_rows, 1), budget // (4 * live_tiles * vocab)))
