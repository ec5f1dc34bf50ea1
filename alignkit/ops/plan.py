"""The plan chooser: the one place that decides how a fused loss forms its gradient.

A fused loss (preference_loss, policy_loss) can run under several plans that give the same result:
    recompute          the generic op; backward recomputes each logits tile: 4 GEMMs per token.
                       Peak: grad_W + grad_h + tile_bytes.
    single_pass        G formed in forward from full-vocabulary tiles (alignkit/ops/pair_pass.py,
                       token_pass.py): 3 GEMMs per token of the unscaled group and of the deferred
                       tokens within the keep budget, 4 past it.
                       Peak: grad_W + grad_h + single_pass_bytes + keep_bytes (the 1.3x bound).
    single_pass_fast   the single pass keeping every deferred token's G (3 GEMMs for every token)
                       in a buffer of up to N·V fp32, with tiles of up to 4 x single_pass_bytes.
                       Peak: up to what full [N, V] fp32 logits take.
Filter: TileOptions.memory ("min", "bound", "fast" or a byte cap) keeps the plans whose peak fits.
Choice, in order:
  1. a pinned plan (TileOptions.plan, or the front door's grad_mode);
  2. the one feasible plan, where only one fits;
  3. the plan cache: this process's, then the disk's ($XDG_CACHE_HOME/alignkit/plans-v2.json,
     ALIGNKIT_PLAN_CACHE; JSON only: each plan with the times it was decided by);
  4. autotune=True (the default): measured on the calls' own inputs. The next calls of a new key
     each run one candidate, timed forward and backward: a timed candidate forms its gradient in
     forward (the single passes always do; the recompute does so while it is timed), so the
     call's own work is the measurement and tuning costs no extra call, only the slower
     candidates' excess on 3 x (candidates) calls. Rounds interleave the candidates (A B, B A, ...),
     and the winner is the least-memory candidate within MARGIN of the fastest, each scored by
     its time over the first candidate's in the same round (the median over the rounds: drift
     cancels within a round). It is cached in memory, and on disk where the rounds agree (each
     round after the first, alone, picks the same winner, with no margin and with twice the
     margin too, so a close call is not kept); where they do not, one more round;
     still disagreeing (the candidates are too close to call on this machine, or another process
     took the cores), the choice holds for this process only and the next one measures again,
     so one disturbed measurement is not kept for good;
  5. autotune=False: the cost model (GEMM FLOPs at this machine's measured GEMM rate, tile
     traffic at its measured bandwidth; machine_constants), with the same margin.
Under torch.distributed the plan key leaves out what a rank's own batch sets (its token count and
number of sequences: ranks see different batches but the same calls), a new key is decided
collectively on its first call (rank 0 proposes, from its disk cache, the cost model or a tuning
order, and broadcasts), and no collective depends on a rank's own batch, so the ranks cannot
wait on each other (_choose_across_ranks).
torch.compile and no_grad keep their fixed rules (the front doors: a compiled graph cannot time,
and without a gradient the recompute's forward is one GEMM per tile).
A head split over the vocabulary across ranks (alignkit/ops/vocab_parallel.py) has one candidate,
the recompute on the shards: the single passes need full-vocabulary tiles, and
pass_budget.pass_blocker says so before the chooser runs (a pinned single pass is refused).

The plan key: the device and machine (CPU model and flags, or GPU name and capability), the loss
kind (pair pass tied / untied, token pass, coupled token pass), dtype, backend, H, V (rounded up
to 1024), the token count (rounded up to a power of 2), the number of sequences, and the memory
option. Measurements behind the plans: bench/HISTORY.md, "The plan chooser".
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from alignkit.ops import plan_store
from alignkit.ops.backends import gemm_dtype, resolve
from alignkit.ops.options import PLANS, TileOptions
from alignkit.ops.pass_budget import keep_rows, tile_rows
# the store's names, here too: callers (and tests) read them from the chooser
from alignkit.ops.plan_store import (_distributed, _read_disk, _skey, _sync, _write_disk,
                                     cache_path, disk_plan, machine_constants, machine_id,
                                     model_cost, plan_key, plan_record)

__all__ = ["Candidate", "Choice", "LAST", "budgets", "limit", "candidates", "choose_and_run",
           "time_candidate", "forget", "note", "plan_key", "cache_path", "machine_id",
           "machine_constants", "model_cost", "_read_disk", "_write_disk", "_skey"]

log = logging.getLogger("alignkit.plan")

ROUNDS = 3          # timed runs of each candidate before a new key is decided (min of them)
MARGIN = 0.03       # a larger-memory plan must be this much faster (per token) to be chosen
FAST_TILE_FACTOR = 4


@dataclass(frozen=True)
class Candidate:
    """One plan for one call. run(hidden, weight, bias) -> (loss, metrics); forms_grads: its
    forward forms the gradient (the single passes), so timing its forward times all its work;
    peak: the engine's bytes beyond the inputs; cost(machine constants) -> the cost model's
    seconds."""
    name: str
    peak: int
    run: Callable
    forms_grads: bool
    cost: Callable
    tile: int = 0
    alias: bool = False     # the same schedule as a plan before it: pinnable, never timed


@dataclass
class Choice:
    """What the chooser did for the last call (alignkit bench prints it; tests read it)."""
    key: tuple
    plan: str
    how: str            # pinned | only | cache | disk | tuning | measured | model
    feasible: tuple


LAST: list[Choice] = []
_DECIDED: dict = {}
_TUNING: dict = {}


# ---- the memory side -------------------------------------------------------------------------

def budgets(V: int, H: int, rows: int, device, dtype, backend: str, t: TileOptions,
            deferred: int | None = None):
    """{plan: (peak bytes, the tile the memory bound counts, TileOptions it runs with)} for a head [V, H] over
    `rows` token rows (no tile is longer than the call, and no pass keeps more rows than the
    `deferred` upper bound). t: the caller's options, resolved."""
    deferred = rows if deferred is None else deferred
    device = torch.device(device)
    grad_w, grad_h = grad_w_bytes(V, H, device, dtype), rows * H * 4
    # the single passes accumulate grad_W in fp32 and hand it back in the weight's dtype
    acc_w = V * H * 4 + (V * H * dtype.itemsize if dtype != torch.float32 else 0)
    per = 6 if (device.type == "cuda" or resolve(backend, device) == "triton") and \
        dtype == torch.bfloat16 else (2 if gemm_dtype(dtype, device) != torch.float32 else 4)
    r_tile = min(t.tile_bytes, rows * min(t.vocab_block, V) * 4 + 2 * rows * H * 4)
    out = {"recompute": (grad_w + grad_h + r_tile, r_tile, t)}
    tile = t.gpu_chunk_bytes if device.type == "cuda" else t.single_pass_bytes
    # the default tile, which the memory bound counts ("the tile")
    bound_tile = min(tile_rows(V, device, dtype, t, H=H, backend=backend), rows) * V * per
    if deferred == 0:
        # nothing to keep (one tied pair, a token-level loss): the keep budget lengthens the tile
        # instead, in the same buffer (the same bound)
        t = TileOptions(**{**_fields(t), "single_pass_bytes": t.single_pass_bytes + t.keep_bytes,
                           "gpu_chunk_bytes": t.gpu_chunk_bytes + t.keep_bytes
                           if device.type == "cuda" else t.gpu_chunk_bytes, "keep_bytes": 0})
    sp_rows = min(tile_rows(V, device, dtype, t, H=H, backend=backend), rows)
    # one buffer holds the tile and, in place, the kept rows (VocabTiles): the larger of the two
    sp_buf = max(sp_rows, min(keep_rows(V, H, device, dtype, t, backend), deferred, rows)) * V * per
    out["single_pass"] = (acc_w + grad_h + sp_buf + 2 * sp_rows * H * 4, bound_tile, t)
    # fast: every deferred token kept, and tiles up to FAST_TILE_FACTOR x longer, within half of
    # what full [rows, V] logits take (so it stays below a peer that holds them all)
    fast_tile = max(tile, min(FAST_TILE_FACTOR * tile, rows * V * per // 2))
    ft = TileOptions(**{**_fields(t), "single_pass_bytes": fast_tile,
                        "gpu_chunk_bytes": fast_tile if device.type == "cuda" else t.gpu_chunk_bytes,
                        "keep_bytes": deferred * V * per})
    f_rows = min(tile_rows(V, device, dtype, ft, H=H, backend=backend), rows)
    f_buf = max(f_rows, min(deferred, rows)) * V * per
    out["single_pass_fast"] = (acc_w + grad_h + f_buf + 2 * f_rows * H * 4, f_rows * V * per, ft)
    return out


def grad_w_bytes(V: int, H: int, device, dtype) -> int:
    """grad_W as the recompute holds it: fp32 on CUDA (the triton backward's GEMMs write fp32)
    and for fp32 weights; in the weight's dtype on CPU otherwise (its bf16 backward keeps one
    fp32 vocab block)."""
    fp32 = torch.device(device).type == "cuda" or dtype in (torch.float32, torch.float64)
    return V * H * (4 if fp32 else dtype.itemsize)


def limit(memory, V: int, H: int, rows: int, tile: int, device="cpu",
          dtype=torch.float32, recompute_tile: int | None = None) -> float:
    """The byte cap a memory option sets for a head [V, H] over `rows` token rows; tile: the
    default plans' tile bytes (the larger of the recompute's and the single pass's);
    recompute_tile: the recompute's ("min" is its footprint)."""
    grad_w, grad_h = grad_w_bytes(V, H, device, dtype), rows * H * 4
    if memory == "min":
        return grad_w + grad_h + (tile if recompute_tile is None else recompute_tile)
    if memory == "bound":
        return 1.3 * (grad_w + grad_h) + tile
    if memory == "fast":
        # what full [N, V] fp32 logits and their two [N, H] products would take
        return 2 * grad_w + grad_h + rows * V * 4 + 2 * rows * H * 4 + tile
    return float(memory)


def _fields(t: TileOptions) -> dict:
    return {f: getattr(t, f) for f in t.__dataclass_fields__}


# ---- timing ----------------------------------------------------------------------------------

class _Formed(torch.autograd.Function):
    """A loss whose gradients were formed in forward: backward scales them by the upstream
    scalar (a timed recompute call; the single passes have their own)."""

    @staticmethod
    def forward(ctx, value, grads, hidden, weight, bias):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        return (None, None) + tuple(x * g.to(x.dtype) if x is not None else None
                                    for x in ctx.grads)


def time_candidate(c: Candidate, hidden, weight, bias):
    """(result, seconds) of one candidate's whole work on the call's inputs: forward and the
    gradient it forms (a recompute forms it here, by autograd, and returns a loss whose backward
    only scales it)."""
    _sync(hidden.device)
    t0 = time.perf_counter()
    if c.forms_grads:
        out = c.run(hidden, weight, bias)
    else:
        leaves = tuple(x.detach().requires_grad_(x.requires_grad) if x is not None else None
                       for x in (hidden, weight, bias))
        with torch.enable_grad():
            loss, metrics = c.run(*leaves)
            want = [x for x in leaves if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad(loss, want, allow_unused=True))
        grads = tuple(next(got) if x is not None and x.requires_grad else None for x in leaves)
        grads = tuple(torch.zeros_like(x) if g is None and x is not None and x.requires_grad
                      else g for g, x in zip(grads, leaves))
        out = (_Formed.apply(loss.detach(), grads, hidden, weight, bias), metrics)
    _sync(hidden.device)
    return out, time.perf_counter() - t0


def candidates(weight, hidden, rows: int, backend: str, t: TileOptions, run_recompute,
               run_pass=None, deferred: int = 0) -> list:
    """The plans a call can take. run_recompute(hidden, weight, bias) -> (loss, metrics);
    run_pass(tiles) -> such a function for a single pass with those options, or None where no
    single pass can serve the call; deferred: an upper bound on the tokens whose gradient scale is
    known only at the end (no data read: it costs no sync). rows: the token rows of hidden."""
    V, H = weight.shape
    dev, dt = weight.device, weight.dtype
    b = budgets(V, H, rows, dev, dt, backend, t, deferred)
    r_rows = max(1, t.tile_bytes // (4 * t.vocab_block))
    out = [Candidate("recompute", b["recompute"][0], run_recompute, False,
                     lambda c: model_cost("recompute", V, H, rows, 0.0, r_rows, c),
                     b["recompute"][1])]
    if run_pass is None:
        return out
    seen = set()
    for name in ("single_pass", "single_pass_fast"):
        peak, tile, tt = b[name]
        tr = tile_rows(V, dev, dt, tt, H=H, backend=backend)
        kept = min(deferred, keep_rows(V, H, dev, dt, tt, backend))
        f2 = (deferred - kept) / max(rows, 1)
        # fast may add nothing (same tiles, same kept rows): then it is an alias, not a candidate
        out.append(Candidate(name, peak, run_pass(tt), True,
                             lambda c, tr=tr, f2=f2, n=name: model_cost(n, V, H, rows, f2, tr, c),
                             tile, alias=(tr, kept) in seen))
        seen.add((tr, kept))
    return out


# ---- the choice ------------------------------------------------------------------------------

def _least_memory_within_margin(times: dict, cands: dict, margin: float = MARGIN) -> str:
    best = min(times.values())
    ok = [n for n, t in times.items() if t <= best * (1 + margin)]
    return min(ok, key=lambda n: (cands[n].peak, PLANS.index(n)))


def _broadcast(obj):
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def choose_and_run(key: tuple, candidates: list, t: TileOptions, hidden, weight, bias,
                   rows: int, pinned: Optional[str] = None, memory_given: bool = True):
    """Runs the call under the chosen plan: (loss, metrics). candidates: every plan the call
    could take, each with its peak; t: the resolved options (memory, plan, autotune);
    memory_given: the caller set the memory option (TileOptions.memory_given), so a pinned plan
    over it is refused rather than run."""
    cands = {c.name: c for c in candidates}
    V, H = weight.shape
    tile = max(c.tile for c in candidates if c.name != "single_pass_fast")
    cap = limit(t.memory, V, H, rows, tile, weight.device, weight.dtype, cands["recompute"].tile)
    feasible = {n: c for n, c in cands.items() if c.peak <= cap}
    pinned = pinned or t.plan
    if pinned is not None:
        if pinned not in cands:
            raise ValueError(f"plan {pinned!r} cannot serve this call (it can take "
                             f"{', '.join(cands)})")
        if pinned not in feasible and memory_given:
            raise ValueError(f"plan {pinned!r} needs {cands[pinned].peak / 2**20:.1f} MiB, over "
                             f"memory={t.memory!r} ({cap / 2**20:.1f} MiB here): raise memory, "
                             "or leave plan unset")
        return _ran(Choice(key, pinned, "pinned", tuple(feasible)), cands, hidden, weight, bias)
    if not feasible:
        need = min(c.peak for c in cands.values())
        raise ValueError(f"memory={t.memory!r} allows {cap / 2**20:.1f} MiB here, and the "
                         f"smallest plan needs {need / 2**20:.1f} MiB")
    names = tuple(sorted((n for n in feasible if not feasible[n].alias), key=PLANS.index))
    if _distributed():
        return _choose_across_ranks(key, names, feasible, t, hidden, weight, bias, rows)
    if len(names) == 1:
        return _ran(Choice(key, names[0], "only", names), cands, hidden, weight, bias)
    if key in _DECIDED and _DECIDED[key] in feasible:
        return _ran(Choice(key, _DECIDED[key], "cache", names), cands, hidden, weight, bias)
    if key not in _TUNING:
        found = disk_plan(key)
        if found in feasible:
            _DECIDED[key] = found
            return _ran(Choice(key, found, "disk", names), cands, hidden, weight, bias)
        if not t.autotune:
            win = _modelled(names, feasible, weight)
            _DECIDED[key] = win
            return _ran(Choice(key, win, "model", names), cands, hidden, weight, bias)
        _TUNING[key] = _tuning(names)
    return _tune_step(key, _TUNING[key], feasible, names, hidden, weight, bias, rows)


def _modelled(names, feasible, weight) -> str:
    consts = machine_constants(weight.device, weight.dtype)
    return _least_memory_within_margin({n: feasible[n].cost(consts) for n in names}, feasible)


def _tuning(names) -> dict:
    return {"order": list(names) + list(reversed(names)) * (ROUNDS - 1),
            "times": {n: [] for n in names}, "extended": False}


def _decide(runs: dict, feasible: dict):
    """(winner, rounds agree, {candidate: median ratio}) from the tuning runs {candidate: [s per
    token, one a round]}. Round i holds each candidate's i-th run, seconds apart, so each
    candidate is scored by its time over the round's first candidate's, the median over the
    rounds: a drift of the machine's speed (up to ~30% over minutes on a shared 2-core VM)
    cancels within a round, where a minimum per candidate over the whole tuning keeps it. The
    rounds agree when every round after the first (a candidate's first run may carry one-time
    costs) alone picks the same winner, and would with no margin and with twice MARGIN: a
    candidate that sits near the margin (0.99 of the recompute's time, say) is a close call,
    which one process's measurement should not settle for every later process."""
    names = [n for n in runs if runs[n]]
    if not names:
        return _smallest(feasible), True, {}
    k = min(len(runs[n]) for n in names)
    ref = names[0]
    ratio = {n: [runs[n][i] / runs[ref][i] for i in range(k)] for n in names}
    med = {n: statistics.median(r) for n, r in ratio.items()}
    win = _least_memory_within_margin(med, feasible)
    # (fewer than two rounds, where a candidate did not fit some calls: nothing to agree with)
    agree = k >= 2 and all(
        _least_memory_within_margin({n: ratio[n][i] for n in names}, feasible, m) == win
        for i in range(1, k) for m in (0.0, MARGIN, 2 * MARGIN))
    return win, agree, med


def _tune_step(key, state, feasible, names, hidden, weight, bias, rows, across_ranks=False):
    """One tuning call: runs (and times) the next candidate in the key's order; after the last,
    decides (rank 0 decides and broadcasts when across_ranks) and caches the winner: on disk
    only where the rounds agree (_decide), after at most one more round."""
    name = state["order"].pop(0)
    run = name if name in feasible else _smallest(feasible)
    (value, metrics), dt = time_candidate(feasible[run], hidden, weight, bias)
    if run == name:
        state["times"][name].append(dt / max(rows, 1))
    how = "tuning"
    if not state["order"]:
        runs = {n: v for n, v in state["times"].items() if n in feasible}
        win, agree, med = _decide(runs, feasible)
        if not agree and not state["extended"] and not across_ranks:
            # one more round before deciding (not across ranks: each rank's noise is its own,
            # and every rank's order must stay the same length)
            state["extended"] = True
            state["order"] = list(reversed(names))
        else:
            _TUNING.pop(key, None)
            rank0 = not across_ranks or _rank() == 0
            if across_ranks:
                win = _broadcast(win)
            _DECIDED[key] = win
            times = {n: min(v) for n, v in runs.items() if v}
            if rank0 and agree:
                _write_disk({_skey(key): plan_record(win, times, med)})
            log.debug("plan %s for %s: measured %s, time over %s's per round (median) %s: %s",
                      win, key, {n: f"{t * 1e9:.1f} ns/token" for n, t in times.items()},
                      next(iter(med), None), {n: f"{r:.3f}" for n, r in med.items()},
                      "the rounds agree" if agree else "the rounds disagree: not cached on disk")
            how = "measured"
    LAST[:] = [Choice(key, run, how, names)]
    return value, metrics


def _choose_across_ranks(key, names, feasible, t, hidden, weight, bias, rows):
    """The choice under torch.distributed. Every rank makes the same collectives for a key
    whatever its own batch: a key (which holds nothing rank-local, plan_store.plan_key) is new on
    every rank at the same call, and on that call rank 0 alone proposes the plan (the disk's, the
    cost model's) or the tuning order, and broadcasts it; a tuning order is the same length on
    every rank, and its last call broadcasts rank 0's measured winner. A rank whose own batch
    does not fit the agreed plan under the memory option runs its smallest feasible plan (no
    collective depends on which plan a rank runs)."""
    if key in _DECIDED:
        return _ran(Choice(key, _fitting(_DECIDED[key], feasible), "cache", names), feasible,
                    hidden, weight, bias)
    if key not in _TUNING:
        proposal = None
        if _rank() == 0:
            found = disk_plan(key)
            if found in PLANS:
                proposal = ("disk", found)
            elif len(names) == 1:
                proposal = ("only", names[0])
            elif not t.autotune:
                proposal = ("model", _modelled(names, feasible, weight))
            else:
                proposal = ("tune", names)
        how, what = _broadcast(proposal)
        if how != "tune":
            _DECIDED[key] = what
            return _ran(Choice(key, _fitting(what, feasible), how, names), feasible, hidden,
                        weight, bias)
        _TUNING[key] = _tuning(what)
    return _tune_step(key, _TUNING[key], feasible, names, hidden, weight, bias, rows,
                      across_ranks=True)


def _fitting(plan: str, feasible: dict) -> str:
    """The agreed plan where this rank's batch fits it, else this rank's smallest plan."""
    return plan if plan in feasible else _smallest(feasible)


def _smallest(feasible: dict) -> str:
    return min(feasible, key=lambda n: (feasible[n].peak, PLANS.index(n)))


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank()


def _ran(choice: Choice, cands: dict, hidden, weight, bias):
    LAST[:] = [choice]
    log.debug("plan %s for %s (%s)", choice.plan, choice.key, choice.how)
    return cands[choice.plan].run(hidden, weight, bias)


def forget():
    """Drops this process's decided and in-flight plans (tests; a changed machine)."""
    _DECIDED.clear()
    _TUNING.clear()
    plan_store._MACHINE.clear()
    LAST.clear()


def note(name: str, why: str):
    """Records a plan the front door fixed without choosing (no gradient wanted, float64, a
    pinned recompute, torch.compile's rules): the bench and the debug log still name it. Not
    inside a compiled graph (no side effects to trace)."""
    if torch.compiler.is_compiling():
        return
    LAST[:] = [Choice((), name, why, (name,))]
    log.debug("plan %s (%s)", name, why)
