"""Checkpoints written atomically: a temp directory, then one rename.

Layout: ``OUTPUT_DIR/checkpoints/step-00000012/`` with ``model.pt``, ``optimizer.pt`` (full,
unsharded state dicts, so DDP, FSDP2 and single-process runs read each other's),
``scheduler.pt``, ``rng-rank{r}.pt`` (torch, CUDA, python and numpy generators of each rank) and
``state.json`` (step, examples consumed). A run killed at any moment leaves either the previous
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

KEEP = 2


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
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{_rank()}.pt"))
    if _rank() == 0:
        torch.save(msd, os.path.join(tmp, "model.pt"))
        torch.save(osd, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
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
    """A checkpoint file is missing, truncated or malformed (the message names it), or no
    checkpoint under the output directory is intact."""


def _read(path) -> dict:
    """Every file of one checkpoint, read and checked before anything is applied, so a bad
    file leaves the model, optimizer and scheduler untouched."""
    blob = {}
    for key, name in (("model", "model.pt"), ("optimizer", "optimizer.pt"),
                      ("scheduler", "scheduler.pt"), ("rng", f"rng-rank{_rank()}.pt")):
        f = os.path.join(path, name)
        if key == "rng" and not os.path.isfile(f):
            continue                      # written by each rank; a world-size change lacks some
        try:
            blob[key] = torch.load(f, weights_only=False)
        except Exception as e:            # truncated zip, bad pickle, missing file, ...
            raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None
    f = os.path.join(path, "state.json")
    try:
        with open(f) as fh:
            state = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{f}: needs an integer step >= 0, got {state!r}")
    blob["state"] = state
    return blob


def load(path, model, optimizer, scheduler) -> dict:
    """Restores one checkpoint; raises CheckpointError naming a bad file (nothing applied)."""
    blob = _read(path)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, blob["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=opts)
    scheduler.load_state_dict(blob["scheduler"])
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
