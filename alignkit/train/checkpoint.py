"""Checkpoints written atomically: a temp directory, then one rename.

Layout: ``OUTPUT_DIR/checkpoints/step-00000012/`` holding

- ``model.safetensors``: the full, unsharded model state dict (so DDP, FSDP2 and single-process
  runs read each other's);
- ``optimizer.json`` + ``optimizer.safetensors``: the full optimizer state dict, its tensors
  (AdamW's moments and step counts) in the safetensors file and everything else (param groups:
  lr, betas, ...) in the JSON;
- ``scheduler.json``: the scheduler's state dict (plain values; a ``.safetensors`` beside it if
  a scheduler ever holds tensors);
- ``rng-rank{r}.json`` + ``rng-rank{r}.safetensors``: the torch, CUDA, Python ``random`` and numpy
  generators of each rank;
- ``state.json``: step, examples consumed.

Reading a checkpoint unpickles nothing (``alignkit.train.state_files``): a checkpoint is data,
so one copied from a shared disk or a teammate cannot run code on ``--resume``. The ``.pt``
checkpoints of alignkit before this format were pickles; they are refused with the command that
converts one you trust (``alignkit convert-checkpoint DIR --trust``,
``alignkit.train.checkpoint_convert``). A run killed at any moment leaves either the previous
checkpoint or the new one, never a half-written one; the two newest are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from alignkit.train.reference import is_peft
from alignkit.train.state_files import (
    StateFileError,
    read_tensors,
    read_tree,
    rng_from_tree,
    rng_to_tree,
    write_tensors,
    write_tree,
)

KEEP = 2
MODEL = "model.safetensors"
# the pickled files of the format before this one: their presence marks an old checkpoint
OLD_FILES = ("model.pt", "optimizer.pt", "scheduler.pt")


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoints(output_dir):
    d = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.startswith("step-"))


def write_model(path, msd):
    write_tensors(msd, os.path.join(path, MODEL), metadata={"format": "alignkit-checkpoint"})


def write_optimizer(path, osd):
    write_tree(osd, os.path.join(path, "optimizer"))


def write_scheduler(path, ssd):
    write_tree(ssd, os.path.join(path, "scheduler"))


def write_rng(path, rank, state):
    write_tree(rng_to_tree(state), os.path.join(path, f"rng-rank{rank}"))


def save(output_dir, step, state: dict, model, optimizer, scheduler):
    """Collective under torch.distributed: every rank calls it."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    write_rng(tmp, _rank(), rng_state())
    if _rank() == 0:
        write_model(tmp, msd)
        write_optimizer(tmp, osd)
        write_scheduler(tmp, scheduler.state_dict())
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, step=step), f)
    _barrier()
    if _rank() == 0:
        for f in os.listdir(tmp):                 # flush file contents before the rename
            fd = os.open(os.path.join(tmp, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, malformed or of the old pickled format (the
    message names it), or no checkpoint under the output directory is intact."""


def old_format(path) -> bool:
    """A checkpoint directory written before safetensors: pickled ``.pt`` files, no
    ``model.safetensors``."""
    return (not os.path.exists(os.path.join(path, MODEL))
            and any(os.path.exists(os.path.join(path, n)) for n in OLD_FILES))


def _read_state(path) -> dict:
    f = os.path.join(path, "state.json")
    try:
        with open(f) as fh:
            state = json.load(fh)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{f}: needs an integer step >= 0, got {state!r}")
    return state


def _read(path) -> dict:
    """Every file of one checkpoint, read and checked before anything is applied, so a bad
    file leaves the model, optimizer and scheduler untouched."""
    if old_format(path):
        f = next(os.path.join(path, n) for n in OLD_FILES if os.path.exists(os.path.join(path, n)))
        raise CheckpointError(
            f"{f}: a checkpoint of the old pickled format, which alignkit no longer reads "
            "(unpickling a file can run any code it holds). If you trust where it came from, "
            f"convert it: alignkit convert-checkpoint {path} --trust")
    blob = {}
    rng = os.path.join(path, f"rng-rank{_rank()}")
    try:
        blob["model"] = read_tensors(os.path.join(path, MODEL))
        blob["optimizer"] = read_tree(os.path.join(path, "optimizer"))
        blob["scheduler"] = read_tree(os.path.join(path, "scheduler"))
        if os.path.exists(rng + ".json"):     # written by each rank; a world-size change lacks some
            blob["rng"] = rng_from_tree(read_tree(rng), rng + ".json")
    except StateFileError as e:
        raise CheckpointError(str(e)) from None
    for key, what in (("optimizer", dict), ("scheduler", dict)):
        if not isinstance(blob[key], what):
            raise CheckpointError(f"{os.path.join(path, key + '.json')}: holds a "
                                  f"{type(blob[key]).__name__}, not a state dict")
    blob["state"] = _read_state(path)
    return blob


def _all_ranks(ok: bool) -> bool:
    """Whether every rank read the checkpoint: each reads its own RNG file, and ranks that
    disagree on which checkpoint to resume would step different weights."""
    if not dist.is_initialized():
        return ok
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    flag = torch.tensor([int(ok)], device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load(path, model, optimizer, scheduler) -> dict:
    """Restores one checkpoint; raises CheckpointError naming a bad file (nothing applied when
    a file cannot be read or parsed, on any rank)."""
    err = None
    try:
        blob = _read(path)
    except CheckpointError as e:
        err = e
    if not _all_ranks(err is None):
        raise err or CheckpointError(f"{path}: another rank could not read its files")
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    # files that parse but do not fit (a tensor of the wrong shape, a missing key): refused the
    # same way; what was set before the failure is overwritten by the checkpoint loaded next
    for name, apply in ((MODEL, lambda: set_model_state_dict(model, blob["model"], options=opts)),
                        ("optimizer.json", lambda: set_optimizer_state_dict(
                            model, optimizer, blob["optimizer"], options=opts)),
                        ("scheduler.json", lambda: scheduler.load_state_dict(blob["scheduler"]))):
        try:
            apply()
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"{os.path.join(path, name)}: does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
    if "rng" in blob:
        set_rng_state(blob["rng"])
    return blob["state"]


def load_newest(output_dir, model, optimizer, scheduler, warn):
    """(path, state) of the newest intact checkpoint, falling back past unreadable ones with a
    warning each; (None, None) when there is none; CheckpointError when none of them is intact."""
    found = checkpoints(output_dir)
    errors = []
    for path in reversed(found):
        try:
            return path, load(path, model, optimizer, scheduler)
        except CheckpointError as e:
            errors.append(str(e))
            warn(f"checkpoint {path} is not intact ({e}); trying the previous one")
    if found:
        raise CheckpointError(f"no intact checkpoint under {os.path.join(output_dir, 'checkpoints')}"
                              ": " + "; ".join(errors))
    return None, None


def save_final(output_dir, model, tokenizer, module):
    """OUTPUT_DIR/final: the model as ``from_pretrained`` reads it (a peft model: its adapter)
    and the tokenizer. Collective: the full state dict is gathered from every rank (FSDP2), and
    rank 0 writes it."""
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    if _rank() == 0:
        out = os.path.join(output_dir, "final")
        if is_peft(model):                             # a peft model saves its adapter
            model.save_pretrained(out)
        else:
            sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
            model.save_pretrained(out, state_dict=sd)
        tokenizer.save_pretrained(out)
    _barrier()
