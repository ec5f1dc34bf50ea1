"""The fused preference loss from a transformers model and a batch: for ``Trainer.compute_loss``
overrides and hand-written loops.

Batch (HF conventions; ``pack_pairs`` builds one from token lists):
- ``input_ids`` [R, L], ``attention_mask`` ([R, L], or a 4D float mask for packed rows),
  optional ``position_ids`` [R, L];
- optional ``alignkit_layout``: a ``VarlenLayout`` (``pack_pairs(..., attention="varlen")``) for
  a model whose attn_implementation is alignkit's varlen (``alignkit.model.attention``): packed rows
  with no mask, passed down to every attention call;
- ``labels`` [R, L]: the token ids where they are to be scored, -100 elsewhere (prompt,
  padding); label t is scored from position t-1, as HF's own loss shifts;
- optional ``sequence_ids`` [R, L]: which sequence each token belongs to (chosen 0..B-1, then
  rejected B..2B-1; -1 for padding). Without it, row r is sequence r (chosen rows first).

The model is called as ``model(...)`` -- through DDP / FSDP wrappers, so their gradient sync and
gathering happen -- with alignkit's fused forward installed on the underlying CausalLM
(``patch_model``, once); no [tokens x vocab] logits are formed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from alignkit.api import reduce_sequences
from alignkit.integrations.head import patch_model
from alignkit.model.attention import require_varlen


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _ensure_patched(model):
    inner = _unwrap(model)
    if not getattr(inner, "_alignkit_hf_patched", False):
        patch_model(inner)
        inner._alignkit_hf_patched = True


def _check_batch(batch, model):
    for k in ("input_ids", "labels"):
        if k not in batch:
            raise KeyError(f"batch needs {k!r} (see alignkit.integrations.hf)")
    ids, labels = batch["input_ids"], batch["labels"]
    if labels.shape != ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(ids.shape)}; got "
                         f"{tuple(labels.shape)}")
    kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if batch.get("alignkit_layout") is not None:
        require_varlen(_unwrap(model))
        # collators leave it where it was built
        kw["alignkit_layout"] = batch["alignkit_layout"].to(ids.device)
    return ids, labels, kw


def _segments(batch, lab, num_sequences):
    """(segment ids [R, L-1] of the shifted labels, S): sequence_ids, or row r = sequence r."""
    seq = batch.get("sequence_ids")
    if seq is None:
        R = lab.shape[0]
        return torch.arange(R, device=lab.device)[:, None].expand(lab.shape), R
    seg = seq[:, 1:]
    if bool((seg[lab != -100] < 0).any()):
        raise ValueError("sequence_ids is -1 at a labelled token: every scored token needs its "
                         "sequence")
    S = num_sequences if num_sequences is not None else int(seg.max()) + 1
    # unlabelled positions (log-prob 0, not counted) may belong to no sequence: any index does
    return seg.clamp(min=0), S


def sequence_logprobs_from_model(model, batch: dict, *, num_sequences: Optional[int] = None):
    """(sums [S], counts [S]) of the labelled tokens' log-probs per sequence."""
    ids, labels, kw = _check_batch(batch, model)
    _ensure_patched(model)
    out = model(input_ids=ids, labels=labels, **kw)
    lp, lab = out.log_probs, labels[:, 1:]              # [R, L-1], label t+1 from position t
    if batch.get("sequence_ids") is None:
        return reduce_sequences(lp, lab)
    seg, S = _segments(batch, lab, num_sequences)
    return reduce_sequences(lp, lab, segment_ids=seg, num_segments=S)


def fused_preference_loss(model, batch: dict, *, loss: str = "dpo",
                          ref_logprobs: Optional[Tensor] = None, **loss_options):
    """(loss, metrics) of a chosen/rejected batch through ``alignkit.preference_loss`` on the
    body's hidden states, inside the model's call (DDP / FSDP wrappers see it) and the head's
    (sharded heads are gathered): the fused engine, its single pass included (dpo, simpo, cpo,
    orpo with their options, ``grad_mode`` among them). For DPO give ``ref_logprobs`` [2B]
    (e.g. ``sequence_logprobs_from_model(ref_model, batch)[0]`` under ``torch.no_grad()``, or
    cached)."""
    ids, labels, kw = _check_batch(batch, model)
    _ensure_patched(model)
    seg, S = _segments(batch, labels[:, 1:], None)
    pref = dict(loss_options, loss=loss, ref_logprobs=ref_logprobs, sequence_ids=seg,
                num_sequences=S)
    out = model(input_ids=ids, labels=labels, alignkit_preference=pref, **kw)
    return out.loss, out.metrics


def pack_pairs(pairs: Sequence, *, packing: str = "padded", pad_id: int = 0,
               attention: str = "dense") -> dict:
    """[(prompt_ids, chosen_ids, rejected_ids)] -> a batch for fused_preference_loss.
    ``padded``: 2B right-padded rows; ``padding_free``: one row with restarting position_ids,
    sequence_ids and (attention ``dense``) a 4D float block-causal mask, or (``varlen``) an
    all-ones mask and an ``alignkit_layout`` for a varlen model: no [N, N] mask
    (shared_prompt scores one position twice, which HF-style labels cannot express: use
    alignkit's own trainer for it)."""
    from alignkit.train import Example, collate
    if packing not in ("padded", "padding_free"):
        raise ValueError(f"packing must be padded or padding_free; got {packing!r}")
    exs = [Example(tuple(p), (tuple(c), tuple(r))) for p, c, r in pairs]
    b = collate(exs, list(range(len(exs))), packing, pad_id, attention=attention)
    R, L = b.input_ids.shape
    labels = torch.full((R * L,), -100, dtype=torch.long)
    labels[b.gather + 1] = b.labels                    # position g predicts token g+1
    seq = torch.full((R * L,), -1, dtype=torch.long)
    seq[b.gather + 1] = b.segment_ids
    if packing == "padding_free":                      # the prompt tokens belong to it too
        starts = (b.position_ids.reshape(-1) == 0).nonzero().squeeze(1).tolist() + [R * L]
        for s, (a, e) in enumerate(zip(starts, starts[1:])):
            seq[a:e] = s
    else:
        real = torch.arange(L)[None] <= (b.last - torch.arange(R) * L)[:, None]  # not padding
        seq = torch.where(real.reshape(-1), torch.arange(R).repeat_interleave(L), seq)
    out = dict(input_ids=b.input_ids, attention_mask=b.attention_mask,
               position_ids=b.position_ids, labels=labels.view(R, L), sequence_ids=seq.view(R, L))
    if b.layout is not None:
        out["alignkit_layout"] = b.layout
    return out
