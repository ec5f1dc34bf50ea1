"""``alignkit convert-checkpoint DIR --trust``: old pickled checkpoints -> the current format.

alignkit's checkpoints were ``torch.save`` pickles (``model.pt``, ``optimizer.pt``,
``scheduler.pt``, ``rng-rank{r}.pt``); the trainer no longer reads them, since unpickling a
crafted file runs code. This converts one you trust, in place: each file is read with
``torch.load(weights_only=True)`` (torch's restricted unpickler, which builds tensors and plain
values only) plus, for the RNG files, the numpy types a numpy generator state pickles
(``safe_globals``); anything else in a file is refused, so even a file that is not what it
claims runs no code here. ``--trust`` is still required: the restricted unpickler is a far larger
parser than JSON and safetensors, and a file read once should come from someone you trust.

The new files are written next to the old ones, ``model.safetensors`` last (its presence marks
the new format), then the ``.pt`` files are removed; a conversion killed part way is simply run
again.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np
import torch

from alignkit.train.checkpoint import (
    OLD_FILES,
    CheckpointError,
    old_format,
    write_model,
    write_optimizer,
    write_rng,
    write_scheduler,
)


def _numpy_rng_globals():
    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_pt(f, extra_globals=()):
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:                # a truncated zip, or a global outside the allow-list
        raise CheckpointError(f"{f}: cannot be converted ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def old_checkpoints(path) -> list:
    """The old-format checkpoint directories DIR names: DIR itself, or those under
    DIR/checkpoints (an output directory) or DIR (a checkpoints directory)."""
    if old_format(path):
        return [path]
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            found = [os.path.join(root, n) for n in sorted(os.listdir(root))
                     if n.startswith("step-") and old_format(os.path.join(root, n))]
            if found:
                return found
    return []


def convert_one(path) -> None:
    """Reads every old file of one checkpoint before writing anything."""
    f = {n: os.path.join(path, n) for n in OLD_FILES}
    model, optimizer, scheduler = (_load_pt(f[n]) for n in OLD_FILES)
    rngs = {}
    for r in glob.glob(os.path.join(path, "rng-rank*.pt")):
        m = re.fullmatch(r"rng-rank(\d+)\.pt", os.path.basename(r))
        if m:
            rngs[int(m.group(1))] = (r, _load_pt(r, _numpy_rng_globals()))
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{f['model.pt']}: cannot be converted (not a state dict of tensors)")
    try:
        write_optimizer(path, optimizer)
        write_scheduler(path, scheduler)
        for rank, (r, state) in rngs.items():
            write_rng(path, rank, state)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be converted ({type(e).__name__}: {e})") from None
    write_model(path, model)
    for old in [*f.values(), *(r for r, _ in rngs.values())]:
        os.remove(old)


def convert(path, trust: bool, log=print) -> list:
    """Converts every old-format checkpoint ``path`` names; returns their directories."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (give a checkpoint directory, "
                              "OUTPUT_DIR/checkpoints or OUTPUT_DIR)")
    found = old_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: holds no old-format checkpoint (a step-* directory with "
                              f"{', '.join(OLD_FILES)}); nothing to convert")
    if not trust:
        raise CheckpointError(
            f"{path}: converting reads {len(found)} pickled checkpoint(s) "
            f"({', '.join(os.path.basename(p) for p in found)}); pass --trust if you trust where "
            "they came from")
    for p in found:
        convert_one(p)
        log(f"converted {p}")
    return found
