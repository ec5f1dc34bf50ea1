"""Micro-batches for one forward pass: padded, padding_free and shared_prompt layouts.

Every layout yields the same thing for the loss: ``gather`` [M] (flat indices into the body's
hidden states [rows * L, H]), ``labels`` [M] and ``segment_ids`` [M] in [0, S), for the S
sequences (pairs: chosen 0..B-1, then rejected B..2B-1). Only response tokens are gathered, so
the LM-head GEMMs run over response tokens alone: prompt and padding never meet the vocabulary.
Hidden position t predicts token t+1, so a response of R tokens after a prompt of P tokens
gathers positions P-1 .. P+R-2.

- ``padded``: one row per sequence, right-padded to the longest; a 2D attention mask.
- ``padding_free``: all sequences concatenated into one row; ``position_ids`` restart per
  sequence; a 4D float block-causal mask [1, 1, N, N] (0 or the dtype's min) keeps each sequence
  to itself (position_ids alone do not, with sdpa or eager attention).
- ``shared_prompt``: one row per pair, [prompt, chosen, rejected] right-padded; a 4D float mask
  [B, 1, L, L] lets both responses attend to the prompt and not to each other; positions continue
  after the prompt for both. The prompt is computed once per pair. The last prompt position
  predicts the first token of both responses, so it is gathered twice.

The dense 4D mask costs 4·N² bytes per row (64 MiB at N=4096) and, with sdpa on CPU, attention
over a masked row costs O(N²) whatever the mask: ``padding_free`` puts the whole micro-batch in
one row, so its attention grows with the square of the micro-batch's tokens (bench/RESULTS.md).
``padded`` uses the causal kernel and no dense mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Batch:
    input_ids: Tensor            # [rows, L]
    position_ids: Tensor         # [rows, L]
    attention_mask: Tensor       # [rows, L] (padded) or [1, 1, N, N] float (packed)
    gather: Tensor               # [M] int64 into the flattened [rows * L] positions
    labels: Tensor               # [M]
    segment_ids: Tensor          # [M]
    num_sequences: int           # S
    tokens: int                  # Σ over sequences of (prompt + response) tokens
    ref_index: Tensor            # [S] example index of each sequence (for cached references)
    num_examples: int            # b: S = b * (sequences per example)

    def to(self, device):
        for k in ("input_ids", "position_ids", "attention_mask", "gather", "labels",
                  "segment_ids"):
            setattr(self, k, getattr(self, k).to(device, non_blocking=True))
        return self


def sequences_of(examples, indices, kl_partner=None):
    """[(prompt, response)] in loss order: pairs -> chosen..., rejected...; KTO -> completions...,
    then (prompt_i, completion of kl_partner(i)) for the KL estimate when kl_partner is given."""
    exs = [examples[i] for i in indices]
    if exs[0].desirable is None:
        return [(e.prompt, e.responses[0]) for e in exs] + [(e.prompt, e.responses[1]) for e in exs]
    seqs = [(e.prompt, e.responses[0]) for e in exs]
    if kl_partner is not None:
        seqs += [(e.prompt, examples[kl_partner(i)].responses[0]) for e, i in zip(exs, indices)]
    return seqs


def _block_mask(blocks: Sequence[Sequence[tuple]], n: int, dtype) -> Tensor:
    """blocks: per block a list of (start, length, attends) spans in one row of n positions,
    `attends` being the span indices inside the block this span sees fully (earlier spans); each
    span is causal within itself. Returns [1, 1, n, n] with 0 where attention is allowed."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for spans in blocks:
        for start, length, attends in spans:
            q = slice(start, start + length)
            allowed[q, q] = torch.ones(length, length, dtype=torch.bool).tril()
            for j in attends:
                s2, l2, _ = spans[j]
                allowed[q, s2:s2 + l2] = True
    mask = torch.zeros(n, n, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def collate(examples, indices, packing: str, pad_id: int, *, kl_partner=None,
            mask_dtype=torch.float32) -> Batch:
    seqs = sequences_of(examples, indices, kl_partner)
    S = len(seqs)
    tokens = sum(len(p) + len(r) for p, r in seqs)
    ref_index = torch.tensor(list(indices) * (S // len(indices)), dtype=torch.long)
    gather, labels, segs = [], [], []

    def add(seg, positions, resp):
        gather.extend(positions)
        labels.extend(resp)
        segs.extend([seg] * len(resp))

    if packing == "padded":
        L = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((S, L), pad_id, dtype=torch.long)
        am = torch.zeros(S, L, dtype=torch.long)
        for s, (p, r) in enumerate(seqs):
            n = len(p) + len(r)
            ids[s, :n] = torch.tensor(p + r)
            am[s, :n] = 1
            add(s, range(s * L + len(p) - 1, s * L + n - 1), r)
        pos = torch.arange(L).expand(S, L).contiguous()
        mask = am
    elif packing == "padding_free":
        flat, pos_l, blocks, off = [], [], [], 0
        for s, (p, r) in enumerate(seqs):
            n = len(p) + len(r)
            flat.extend(p + r)
            pos_l.extend(range(n))
            blocks.append([(off, n, ())])
            add(s, range(off + len(p) - 1, off + n - 1), r)
            off += n
        ids, pos = torch.tensor([flat]), torch.tensor([pos_l])
        mask = _block_mask(blocks, off, mask_dtype)
    elif packing == "shared_prompt":
        # one row per pair, right-padded: a row is [prompt, chosen, rejected, pad...]
        B = S // 2
        if examples[indices[0]].desirable is not None:
            raise ValueError("packing shared_prompt needs pairs; KTO examples are unpaired")
        L = max(len(seqs[i][0]) + len(seqs[i][1]) + len(seqs[B + i][1]) for i in range(B))
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        pos = torch.zeros(B, L, dtype=torch.long)
        masks = []
        for i in range(B):
            (p, c), (_, r) = seqs[i], seqs[B + i]
            P, C, R = len(p), len(c), len(r)
            off = i * L
            ids[i, :P + C + R] = torch.tensor(p + c + r)
            pos[i, :P + C + R] = torch.tensor(list(range(P)) + list(range(P, P + C))
                                              + list(range(P, P + R)))
            masks.append(_block_mask([[(0, P, ()), (P, C, (0,)), (P + C, R, (0,))]], L,
                                     mask_dtype))
            last_prompt = off + P - 1
            add(i, [last_prompt] + list(range(off + P, off + P + C - 1)) if C else [], c)
            add(B + i, [last_prompt] + list(range(off + P + C, off + P + C + R - 1)) if R else [],
                r)
        mask = torch.cat(masks, 0)
    else:
        raise ValueError(f"packing must be padded, padding_free or shared_prompt; got {packing!r}")
    return Batch(ids, pos, mask, torch.tensor(gather, dtype=torch.long),
                 torch.tensor(labels, dtype=torch.long), torch.tensor(segs, dtype=torch.long),
                 S, tokens, ref_index, len(indices))


def pad_id_of(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


__all__ = ["Batch", "collate", "sequences_of", "pad_id_of"]
