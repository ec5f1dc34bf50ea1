"""The plan chooser's store (alignkit/ops/plan.py): the plan key, the on-disk cache (JSON only)
and this machine's measured constants for the cost model (GEMM rate, bandwidth).

The cache file maps a plan key to a record {"plan": name, "ns_per_token": {candidate: fastest
run}, "ratio": {candidate: time over the first candidate's in the same round, median}, "date"}:
what was measured stays beside what was decided, so a stale or doubtful entry can be read and
judged."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import time

import torch

from alignkit.ops.backends import cpu_flags, gemm_dtype
from alignkit.ops.env import env

log = logging.getLogger("alignkit.plan")
# v2: records with their measurements, keyed by a machine id with the CPU's family and model
# (v1 held bare plan names under the model name alone, which a Zen 2 and a Zen 3 VM can share)
CACHE_FILE = "plans-v2.json"
_MACHINE: dict = {}


# ---- the key and the cache ---------------------------------------------------------------------

def machine_id(device) -> str:
    """The machine a measurement holds for: GPU name and capability, or CPU model and flags."""
    return _machine_id(str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _machine_id(device: str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda:{p.name}:sm{p.major}{p.minor}"
    # the model name alone can be "AMD EPYC" on a VM whatever the generation: the family and model
    # numbers tell a Zen 2 from a Zen 3, which the flags do not
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():            # the first processor's block is enough
                    break
                k, _, v = line.partition(":")
                info[k.strip()] = v.strip()
    except OSError:
        pass
    info = {"model name": "cpu", "cpu family": "?", "model": "?", **info}
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4")))
    return (f"cpu:{info['model name']}:f{info['cpu family']}m{info['model']}:{os.cpu_count()}c:"
            f"{','.join(flags)}")


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def plan_key(kind: str, device, dtype, backend: str, V: int, H: int, rows: int, S: int,
             memory) -> tuple:
    # under torch.distributed the key holds nothing a rank's own batch sets (its token count, its
    # number of sequences): every rank must see the same keys in the same order, since a new key
    # is decided collectively (plan.choose_and_run)
    if _distributed():
        tokens = S = 0
    else:
        tokens = 1 << max(0, math.ceil(math.log2(max(rows, 1))))
    return (machine_id(device), kind, str(dtype).replace("torch.", ""), backend, H,
            -(-V // 1024) * 1024, tokens, S, str(memory))


def cache_path() -> str:
    root = env("ALIGNKIT_PLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "alignkit")
    return os.path.join(root, CACHE_FILE)


def _read_disk() -> dict:
    """The plan cache: JSON only (nothing in it is executed); a missing, unreadable or malformed
    file reads as empty, and a value that is not a known plan name is ignored by the caller."""
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# alignkit bench (without --cached-plans) measures afresh: it reads no decided plan from disk,
# and writes what it measures (read_disk_plans)
_READ_PLANS = [True]


def read_disk_plans(on: bool):
    """Whether the chooser takes decided plans from the disk cache (default True). Off, every new
    key is decided afresh in this process and the fresh decision is written over the old one; the
    machine constants are still read."""
    _READ_PLANS[0] = bool(on)


def disk_plan(key: tuple):
    """The plan the disk cache holds for a key, or None (none, an unknown name, reading off)."""
    if not _READ_PLANS[0]:
        return None
    rec = _read_disk().get(_skey(key))
    return rec.get("plan") if isinstance(rec, dict) else None


def plan_record(plan: str, times: dict, ratios: dict) -> dict:
    """A decided plan as the cache stores it, with its measurements: each candidate's fastest
    run (ns per token) and its time over the first candidate's in the same round (median)."""
    return {"plan": plan, "ns_per_token": {n: round(t * 1e9, 3) for n, t in times.items()},
            "ratio": {n: round(r, 4) for n, r in ratios.items()},
            "date": time.strftime("%Y-%m-%d")}


def _write_disk(entries: dict):
    """Merges entries into the cache file (read, update, atomic replace): another process may
    have written its own keys meanwhile."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_disk()
        data.update(entries)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:            # a read-only home: the choice still holds in this process
        log.debug("plan cache not written (%s): %s", path, e)


def _skey(key: tuple) -> str:
    return "|".join(map(str, key))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- the cost model --------------------------------------------------------------------------

def machine_constants(device, dtype) -> dict:
    """This machine's GEMM rate (FLOP/s) in the head's GEMM dtype and memory bandwidth (B/s),
    measured once per machine and cached on disk beside the plans."""
    device = torch.device(device)
    gdt = gemm_dtype(dtype, device)
    mkey = f"machine|{machine_id(device)}|{str(gdt).replace('torch.', '')}"
    if mkey in _MACHINE:
        return _MACHINE[mkey]
    disk = _read_disk().get(mkey)
    if isinstance(disk, dict) and all(isinstance(disk.get(k), (int, float)) and disk[k] > 0
                                      for k in ("gemm", "bandwidth")):
        _MACHINE[mkey] = disk
        return disk
    a = torch.randn(1024, 512, device=device).to(gdt)
    b = torch.randn(4096, 512, device=device).to(gdt)
    x = torch.empty(16 << 20, device=device)
    best_g = best_b = float("inf")
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b.t())
        _sync(device)
        t1 = time.perf_counter()
        x.mul_(1.0)
        _sync(device)
        t2 = time.perf_counter()
        best_g, best_b = min(best_g, t1 - t0), min(best_b, t2 - t1)
    consts = {"gemm": 2 * 1024 * 512 * 4096 / best_g, "bandwidth": 2 * x.numel() * 4 / best_b}
    _MACHINE[mkey] = consts
    _write_disk({mkey: consts})
    return consts


def model_cost(plan: str, V: int, H: int, rows: int, formed_twice: float, tile_rows_: int,
               consts: dict) -> float:
    """Seconds by the cost model: GEMM FLOPs at the GEMM rate, plus the elementwise passes over
    the [rows, V] fp32 logits and each tile's read-modify-write of grad_W at the bandwidth.
    formed_twice: the fraction of the tokens a single pass forms twice (4 GEMMs)."""
    gemm = 2.0 * rows * V * H / consts["gemm"]
    logits = rows * V * 4 / consts["bandwidth"]
    grad_w = 2 * V * H * 4 / consts["bandwidth"] * max(1, math.ceil(rows / max(tile_rows_, 1)))
    if plan == "recompute":
        return 4 * gemm + 6 * logits + grad_w
    return (3 + formed_twice) * gemm + 5 * (1 + formed_twice) * logits + grad_w
