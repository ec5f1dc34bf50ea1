"""alignkit's environment variables: documented overrides, read here and nowhere else.

Every one of them overrides a default; an explicit argument (alignkit.TileOptions, a function's
keyword) always wins over it. They are read at call time, so a test's monkeypatch takes effect.

| variable                    | overrides                                   | default                 |
|-----------------------------|---------------------------------------------|-------------------------|
| ALIGNKIT_TILE_BYTES         | TileOptions.tile_bytes                      | 16 MiB, or grad_W / 16  |
| ALIGNKIT_VOCAB_BLOCK        | TileOptions.vocab_block                     | 2048                    |
| ALIGNKIT_SINGLE_PASS_BYTES  | TileOptions.single_pass_bytes               | 64 MiB, or 512 rows     |
| ALIGNKIT_TRITON_G_BYTES     | TileOptions.gpu_chunk_bytes                 | 1 GiB                   |
| ALIGNKIT_TRITON_BWD         | TileOptions.triton_bwd                      | chunked                 |
| ALIGNKIT_KEEP_BYTES         | TileOptions.keep_bytes                      | 0.3 grad_W less temps   |
| ALIGNKIT_MEMORY             | TileOptions.memory (min, bound, fast, bytes)| bound                   |
| ALIGNKIT_PLAN               | TileOptions.plan (pins one plan)            | chosen (ops/plan.py)    |
| ALIGNKIT_AUTOTUNE           | TileOptions.autotune (0: the cost model)    | 1                       |
| ALIGNKIT_PLAN_CACHE         | the plan cache's folder                     | $XDG_CACHE_HOME/alignkit|
| ALIGNKIT_TRITON_BLOCKS      | the Triton launch schedule (BN,BV,BK[,G])   | triton_path's defaults  |
| ALIGNKIT_TRITON_AUTOTUNE    | 1: Triton's autotuner picks the schedule    | 0                       |
| ALIGNKIT_DISABLE_CPP        | 1: backend "auto" skips the C++ kernels     | 0                       |
| ALIGNKIT_CACHE              | the trainer's reference log-prob cache      | ~/.cache/alignkit       |
"""
from __future__ import annotations

import os

VARIABLES = ("ALIGNKIT_TILE_BYTES", "ALIGNKIT_VOCAB_BLOCK", "ALIGNKIT_SINGLE_PASS_BYTES",
             "ALIGNKIT_TRITON_G_BYTES", "ALIGNKIT_TRITON_BWD", "ALIGNKIT_KEEP_BYTES",
             "ALIGNKIT_MEMORY", "ALIGNKIT_PLAN", "ALIGNKIT_AUTOTUNE", "ALIGNKIT_PLAN_CACHE",
             "ALIGNKIT_TRITON_BLOCKS", "ALIGNKIT_TRITON_AUTOTUNE", "ALIGNKIT_DISABLE_CPP",
             "ALIGNKIT_CACHE")


def env(name: str, default=None):
    """The raw value of one documented override (a string), else default. An undocumented name
    is a programming error, so it raises rather than read the environment silently."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not one of alignkit's documented variables: {VARIABLES}")
    return os.environ.get(name, default)


def env_int(name: str):
    """An integer override, or None where unset; a malformed value raises, naming it."""
    raw = env(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def env_flag(name: str) -> bool | None:
    """A 0/1 override, or None where unset."""
    raw = env(name)
    if raw is None:
        return None
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"
