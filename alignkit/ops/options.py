"""The engine's options: TileOptions (alias EngineOptions), the one options object, and
LogprobArgs, the record of one log-prob call's own arguments (not options: see its doc)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alignkit.ops.env import env, env_flag, env_int

BACKENDS = ("auto", "torch", "triton", "cpp")


def is_real(v) -> bool:
    """A finite int or float; a bool is not a number here (temperature=True is a mistake). The
    one predicate behind every numeric option's check (ops, losses, the trainer's config)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


TRITON_BWD_MODES = ("chunked", "atomic", "blocked")
MEMORY_OPTIONS = ("min", "bound", "fast")
# the plans the chooser (alignkit/ops/plan.py) picks among; grad_mode's "recompute" and
# "single_pass" pin the first two
PLANS = ("recompute", "single_pass", "single_pass_fast")


@dataclass(frozen=True)
class TileOptions:
    """The engine's options, one frozen object accepted by every front door (preference_loss,
    policy_loss, sequence_logprobs, linear_token_logprobs, the trainer's ``engine:`` section,
    PPOConfig, patch_trainer / patch_model, ``alignkit bench``). A field left None takes its
    environment variable when the op is called (alignkit/ops/env.py), else the built-in default
    (resolved()). ``alignkit.EngineOptions`` is the same class.

    memory            what the engine may hold beyond the inputs, grad_W and grad_h, and so which
                      plans it may choose among (alignkit/ops/plan.py):
                      "min"   the recompute's footprint: one tile_bytes tile;
                      "bound" (default) 1.3 x (grad_W + grad_h) + the tile: the recompute, or the
                              single pass within its keep budget;
                      "fast"  up to what full [N, V] fp32 logits would take: also the single pass
                              that keeps every deferred token (3 GEMMs for every token);
                      an int  a byte cap on the engine's peak: the plans whose peak fits it.
                      ALIGNKIT_MEMORY.
    plan              pins one plan of PLANS (ALIGNKIT_PLAN); None: chosen by measuring.
    vocab_group       a torch.distributed ProcessGroup: the weight (and bias) passed to the op is
                      this rank's shard of a head split over the vocabulary across the group
                      (Megatron style; alignkit/ops/vocab_parallel.py). None (default): the
                      weight is the whole head, or a DTensor that says how it is split. Not an
                      environment variable: a group exists only in the running program.
    vocab_start       with vocab_group, the first vocabulary id of this rank's shard; None: the
                      shards follow one another in rank order (their sizes are exchanged once
                      per group and shard size, one all-gather of an int).
    autotune          True (default): the first call of a new plan key times the candidates on
                      its own inputs and caches the winner on disk; False: a cost model with
                      this machine's measured GEMM rate and bandwidth picks, with no timing of
                      candidates. ALIGNKIT_AUTOTUNE.
    tile_bytes        the recompute's working set: one [rows, vocab_block] logits tile plus the
                      chunk's hidden rows and their gradient (alignkit/ops/tiling.py).
                      ALIGNKIT_TILE_BYTES; default 16 MiB, or 1/16 of the weight gradient
                      (V·H·4 bytes) when that is larger: every chunk of rows reads and writes
                      all of grad_W once, so a big head wants fewer, longer chunks
                      (bench/HISTORY.md, "Tile budget").
    vocab_block       vocabulary columns per logits GEMM. ALIGNKIT_VOCAB_BLOCK, 2048.
    single_pass_bytes the single pass's full-vocabulary [rows, V] tile on CPU.
                      ALIGNKIT_SINGLE_PASS_BYTES; default 64 MiB, or 512 fp32 rows (512·V·4)
                      where that is larger and within half of grad_W: the pass's GEMMs want
                      long tiles (bench/HISTORY.md, "Single pass or recompute").
    keep_bytes        the single pass's memory beyond its tile for the G tiles of sequences
                      whose scalar is not known yet (several pairs, untied losses): kept, they
                      cost 3 GEMMs per token instead of 4 (formed again). One buffer holds the
                      tile and the kept tiles, so the pass's peak is at most grad_W + grad_h +
                      single_pass_bytes + keep_bytes. ALIGNKIT_KEEP_BYTES; default 3/10 of
                      grad_W (V·H·4·0.3) less the tile's two [rows, H] fp32 temporaries,
                      which keeps the peak within 1.3 x (grad_W + grad_h) + the tile budget;
                      0 keeps only what the tile's own memory holds.
    gpu_chunk_bytes   on CUDA, the triton backward's G chunk and the single pass's tile: the GEMMs
                      that read it want thousands of rows. ALIGNKIT_TRITON_G_BYTES, 1 GiB.
    triton_bwd        the triton backward: chunked (G chunks + two vendor GEMMs, deterministic),
                      atomic or blocked (alignkit.kernels). ALIGNKIT_TRITON_BWD, chunked.
    """

    tile_bytes: int | None = None
    vocab_block: int | None = None
    single_pass_bytes: int | None = None
    gpu_chunk_bytes: int | None = None
    triton_bwd: str | None = None
    keep_bytes: int | None = None
    memory: str | int | None = None
    plan: str | None = None
    autotune: bool | None = None
    vocab_group: object = None
    vocab_start: int | None = None

    _ENV = (("tile_bytes", "ALIGNKIT_TILE_BYTES", 16 << 20),
            ("vocab_block", "ALIGNKIT_VOCAB_BLOCK", 2048),
            ("single_pass_bytes", "ALIGNKIT_SINGLE_PASS_BYTES", 64 << 20),
            ("gpu_chunk_bytes", "ALIGNKIT_TRITON_G_BYTES", 1 << 30))

    def __post_init__(self):
        for name, _, _ in self._ENV:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be None or an int > 0, got {v!r}")
        k = self.keep_bytes
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"keep_bytes must be None or an int >= 0, got {k!r}")
        if self.triton_bwd is not None and self.triton_bwd not in TRITON_BWD_MODES:
            raise ValueError(f"triton_bwd must be None or one of {TRITON_BWD_MODES}, got "
                             f"{self.triton_bwd!r}")
        check_memory("memory", self.memory, allow_none=True)
        if self.plan is not None and self.plan not in PLANS:
            raise ValueError(f"plan must be None or one of {PLANS}, got {self.plan!r}")
        if self.autotune is not None and not isinstance(self.autotune, bool):
            raise TypeError(f"autotune must be None or a bool, got {self.autotune!r}")
        if self.vocab_group is not None:
            if not isinstance(self.vocab_group, dist.ProcessGroup):
                raise TypeError("vocab_group must be None or a torch.distributed.ProcessGroup, "
                                f"got {type(self.vocab_group).__name__}")
        v = self.vocab_start
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"vocab_start must be None or an int >= 0, got {v!r}")
        if v is not None and self.vocab_group is None:
            raise ValueError("vocab_start applies to a vocab-parallel head: give vocab_group too")

    def memory_given(self) -> bool:
        """Whether the caller set the memory option (here or by ALIGNKIT_MEMORY): a pinned plan
        over it is refused; over the default ("bound") it runs, as grad_mode always has."""
        return self.memory is not None or env("ALIGNKIT_MEMORY") is not None

    def resolved(self, head: tuple | None = None) -> "TileOptions":
        """Every field set: the given value, else its environment variable, else the default.
        head: the weight's (V, H), for the defaults that scale with the head (tile_bytes,
        single_pass_bytes, keep_bytes; without it keep_bytes defaults to 0)."""
        vals = {}
        for name, var, default in self._ENV:
            v = getattr(self, name)
            if v is None:
                raw = env_int(var)
                v = raw if raw is not None else default
                if raw is None and head is not None:
                    grad_w = int(head[0]) * int(head[1]) * 4
                    if name == "tile_bytes":
                        v = max(v, grad_w // 16)
                    elif name == "single_pass_bytes":
                        v = max(v, min(512 * int(head[0]) * 4, grad_w // 2))
            vals[name] = v
        mode = self.triton_bwd or env("ALIGNKIT_TRITON_BWD", "chunked")
        keep = self.keep_bytes
        if keep is None:
            keep = env_int("ALIGNKIT_KEEP_BYTES")
            if keep is None and head is not None:
                # 0.3 of grad_W, less the two [rows, H] fp32 temporaries each tile's gradient
                # GEMMs allocate (its hidden rows, and G·W before it is scattered into grad_h):
                # the bound's other 0.3 x grad_h does not hold them when the batch has few
                # tokens for its vocabulary (B2: 1024 tokens, V=151936, peaked 0.08 MiB over)
                V, H = int(head[0]), int(head[1])
                rows = vals["single_pass_bytes"] // (4 * V)
                keep = max(0, V * H * 4 * 3 // 10 - 2 * rows * H * 4)
            elif keep is None:
                keep = 0
            elif keep < 0:
                raise ValueError(f"ALIGNKIT_KEEP_BYTES must be >= 0, got {keep}")
        memory = self.memory
        if memory is None:
            raw = env("ALIGNKIT_MEMORY", "bound")
            memory = int(raw) if raw.isdigit() else raw
            check_memory("ALIGNKIT_MEMORY", memory)
        plan = self.plan if self.plan is not None else env("ALIGNKIT_PLAN")
        if plan is not None and plan not in PLANS:
            raise ValueError(f"ALIGNKIT_PLAN must be one of {PLANS}, got {plan!r}")
        autotune = self.autotune
        if autotune is None:
            flag = env_flag("ALIGNKIT_AUTOTUNE")
            autotune = True if flag is None else flag
        return TileOptions(**vals, triton_bwd=mode, keep_bytes=keep, memory=memory, plan=plan,
                           autotune=autotune, vocab_group=self.vocab_group,
                           vocab_start=self.vocab_start)


EngineOptions = TileOptions


def check_memory(name: str, v, allow_none: bool = False):
    """memory: one of MEMORY_OPTIONS or a byte cap (an int > 0)."""
    if v is None and allow_none:
        return
    if isinstance(v, str) and v in MEMORY_OPTIONS:
        return
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return
    raise ValueError(f"{name} must be one of {MEMORY_OPTIONS} or a byte cap (an int > 0), "
                     f"got {v!r}")


@dataclass(frozen=True)
class LogprobArgs:
    """One log-prob call's own arguments, carried down the layers as one record. Not an options
    object: a user gives these as the public functions' keywords (sequence_logprobs,
    linear_token_logprobs, the losses), and the engine's knobs are TileOptions alone (``tiles``).

    ignore_index:   label value that marks a position with no target; its outputs are exactly 0.0.
    temperature:    logits are divided by it (after the softcap), > 0.
    softcap:        if set, logits become ``softcap * tanh(logits / softcap)`` first (Gemma-2 style).
    return_entropy: also return the entropy of the full distribution at labelled positions.
    backend:        "auto" | "torch" | "triton" | "cpp".
    tiles:          TileOptions (memory and schedule knobs).
    """

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: float | None = None
    return_entropy: bool = False
    backend: str = "auto"
    tiles: TileOptions = TileOptions()

    def __post_init__(self):
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not (is_real(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.softcap is not None and not (is_real(self.softcap) and self.softcap > 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {self.softcap!r}")
        if not isinstance(self.return_entropy, bool):
            raise TypeError(f"return_entropy must be a bool, got {self.return_entropy!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.tiles, TileOptions):
            raise TypeError(f"tiles must be an alignkit.TileOptions, got {self.tiles!r}")

    @property
    def inv_temp(self) -> float:
        return 1.0 / float(self.temperature)

    @property
    def cap(self) -> float:
        """softcap as the kernels take it: 0.0 means off."""
        return float(self.softcap) if self.softcap is not None else 0.0


def materialize_grads(grad_lp, grad_ent, lse, ent):
    """Upstream gradients of (logprobs, entropy) as the backward ops take them: zeros for an
    unused log-prob output, None for the entropy when it was not returned."""
    if grad_lp is None:
        grad_lp = lse.new_zeros(lse.shape[:-1])
    if ent is None:
        return grad_lp, None
    return grad_lp, (grad_ent if grad_ent is not None else torch.zeros_like(ent))
