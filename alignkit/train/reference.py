"""The frozen reference's per-sequence log-probs.

``precompute``: one no-grad pass of the initial model over every example before training (fused,
no logits), cached on disk as ``<cache_dir>/ref-<key>.safetensors`` (tensors ``sums`` and
``counts``: safetensors, so a file planted in a shared cache directory is data, never code). The
key hashes the tokenised examples (so the data and the tokenisation settings), the model's config
and every parameter's bytes, the head options and the packing of KTO's KL partners; a hit skips
the pass. Log-probs of a sequence do not depend on how it is packed (the packing tests prove it),
so the cache is shared by the three packing modes. ``live``: a frozen copy of the initial model scores each micro-batch.
With a peft model (LoRA), the reference is the same model with its adapter disabled: no copy.
"""
from __future__ import annotations

import copy
import contextlib
import hashlib
import json
import os
import warnings
from typing import Optional

import torch

from alignkit.ops.env import env
from alignkit.train.data import examples_digest
from alignkit.train.model import SequenceLogprobs, forward_batch
from alignkit.train.packing import collate
from alignkit.train.state_files import read_tensors, write_tensors


def default_cache_dir() -> str:
    return env("ALIGNKIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "alignkit", "reference")


def model_digest(model) -> str:
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def reference_context(model):
    """no_grad, plus the adapter disabled for a peft model."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if is_peft(model):
        stack.enter_context(model.disable_adapter())
    return stack


class ReferenceTable:
    """Per-example reference sums/counts: table [N, K] for the K sequences of an example."""

    def __init__(self, sums, counts):
        self.sums, self.counts = sums, counts

    def lookup(self, batch, device):
        # sequence s of a batch of b examples is response s // b of example ref_index[s]
        S, idx, b = batch.num_sequences, batch.ref_index, batch.num_examples
        col = torch.arange(S) // b
        return self.sums[idx, col].to(device), self.counts[idx, col].to(device)


def precompute(model, examples, *, packing, pad_id, batch_size, kl_partner, head_backend,
               cache_dir: Optional[str], key_extra: dict, device, log=print,
               attention: str = "dense") -> ReferenceTable:
    key = hashlib.sha256(json.dumps(
        dict(data=examples_digest(examples), model=model_digest(model), extra=key_extra),
        sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir or default_cache_dir(), f"ref-{key}.safetensors")
    if os.path.isfile(path):
        table = _read_cache(path, len(examples))
        if table is not None:
            log(f"reference log-probs: cache hit {path}")
            return table
        log(f"warning: reference cache {path} is not intact; recomputing it")
    K = 2
    sums = torch.zeros(len(examples), K, dtype=torch.float32)
    counts = torch.zeros(len(examples), K, dtype=torch.long)
    module = SequenceLogprobs(model, backend=head_backend)
    was_training = model.training
    model.eval()
    with reference_context(model):
        for start in range(0, len(examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(examples))))
            batch = collate(examples, idx, packing, pad_id, kl_partner=kl_partner,
                            attention=attention).to(device)
            s, c = forward_batch(module, batch)
            k = batch.num_sequences // len(idx)
            sums[idx, :k] = s.float().cpu().view(k, len(idx)).T
            counts[idx, :k] = c.cpu().view(k, len(idx)).T
    model.train(was_training)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_tensors({"sums": sums, "counts": counts}, path)
    log(f"reference log-probs: computed {len(examples)} examples, cached at {path}")
    return ReferenceTable(sums, counts)


def _read_cache(path, n):
    """The cached table, or None (with a warning) when the file is truncated or malformed."""
    try:
        blob = read_tensors(path)
        sums, counts = blob["sums"], blob["counts"]
        if tuple(sums.shape) != (n, 2) or tuple(counts.shape) != (n, 2):
            raise ValueError(f"tables of shape {tuple(sums.shape)}, {tuple(counts.shape)} for "
                             f"{n} examples")
        if sums.dtype != torch.float32 or counts.dtype != torch.long:
            raise ValueError(f"tables of dtype {sums.dtype}, {counts.dtype}")
    except Exception as e:                # truncated, not safetensors, wrong contents
        warnings.warn(f"reference cache {path} cannot be read ({type(e).__name__}: {e}); "
                      "recomputing it", RuntimeWarning)
        return None
    return ReferenceTable(sums, counts)


class LiveReference:
    """A frozen copy of the initial model (or the adapter-disabled peft model) per micro-batch."""

    def __init__(self, model, head_backend):
        self.model = model if is_peft(model) else copy.deepcopy(model).eval().requires_grad_(False)
        self.module = SequenceLogprobs(self.model, backend=head_backend)

    def __call__(self, batch):
        was = self.model.training
        self.model.eval()
        with reference_context(self.model):
            out = forward_batch(self.module, batch)
        self.model.train(was)
        return out
