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
- ``shared_prompt``: two passes of the body. Pass 1 runs [prompt, chosen] per pair, the prompts
  left-padded so that they all end at column Pm; its KV cache, cropped to those Pm columns, is the
  prefix of pass 2, which runs the rejected responses alone. So both responses attend to the
  prompt and not to each other, positions continue after the prompt for both, the prompt is
  computed once per pair, and gradients reach it from both (through the cached keys and values).
  No dense [N, N] mask: pass 1 is an ordinary padded batch, pass 2 a cached continuation. The
  last prompt position predicts the first token of both responses, so it is gathered twice;
  gather indices of pass 2 follow pass 1's (flat index B·L1 + ...).

``padding_free``'s dense 4D mask costs 4·N² bytes (64 MiB at N=4096) and, with sdpa on CPU,
attention over a masked row costs O(N²) whatever the mask, so its attention grows with the
square of the micro-batch's tokens (bench/RESULTS.md). ``padded`` uses the causal kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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
    num_examples: int            # b: S = b * (sequences per example) (ranked rows: K varies)
    last: Tensor                 # [S] flat position of each sequence's last token (rewards)
    # shared_prompt's second pass: the rejected responses over the first pass's prompt KV cache
    input_ids2: Optional[Tensor] = None        # [B, L2]
    position_ids2: Optional[Tensor] = None     # [B, L2]
    attention_mask2: Optional[Tensor] = None   # [B, prefix + L2]
    prefix: int = 0                            # cache columns kept (the left-padded prompts)

    def to(self, device):
        for k in ("input_ids", "position_ids", "attention_mask", "gather", "labels",
                  "segment_ids", "last", "input_ids2", "position_ids2", "attention_mask2"):
            if getattr(self, k) is not None:
                setattr(self, k, getattr(self, k).to(device, non_blocking=True))
        return self


def sequences_of(examples, indices, kl_partner=None):
    """([(prompt, response)], [example index of each]) in loss order, response-major: every
    example's response 0, then every response 1 of those that have one, and so on (pairs ->
    chosen..., rejected...; ranked -> the best responses first; SFT -> one each). KTO ->
    completions..., then (prompt_i, completion of kl_partner(i)) for the KL estimate when
    kl_partner is given."""
    exs = [examples[i] for i in indices]
    if exs[0].desirable is None:
        seqs, owner = [], []
        for k in range(max(len(e.responses) for e in exs)):
            for e, i in zip(exs, indices):
                if k < len(e.responses):
                    seqs.append((e.prompt, e.responses[k]))
                    owner.append(i)
        return seqs, owner
    seqs, owner = [(e.prompt, e.responses[0]) for e in exs], list(indices)
    if kl_partner is not None:
        seqs += [(e.prompt, examples[kl_partner(i)].responses[0]) for e, i in zip(exs, indices)]
        owner += list(indices)
    return seqs, owner


def _block_causal_mask(lengths: Sequence[int], dtype) -> Tensor:
    """[1, 1, N, N] for sequences of `lengths` laid end to end in one row: 0 where a position
    may attend (same sequence, not later), the dtype's min elsewhere."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    n = seq.numel()
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, n, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def collate(examples, indices, packing: str, pad_id: int, *, kl_partner=None,
            mask_dtype=torch.float32) -> Batch:
    seqs, owner = sequences_of(examples, indices, kl_partner)
    S = len(seqs)
    tokens = sum(len(p) + len(r) for p, r in seqs)
    ref_index = torch.tensor(owner, dtype=torch.long)
    gather, labels, segs, last = [], [], [], [0] * S
    second = ()                                 # shared_prompt's second pass

    def add(seg, positions, resp, end):
        gather.extend(positions)
        labels.extend(resp)
        segs.extend([seg] * len(resp))
        last[seg] = end

    if packing == "padded":
        L = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((S, L), pad_id, dtype=torch.long)
        am = torch.zeros(S, L, dtype=torch.long)
        for s, (p, r) in enumerate(seqs):
            n = len(p) + len(r)
            ids[s, :n] = torch.tensor(p + r)
            am[s, :n] = 1
            add(s, range(s * L + len(p) - 1, s * L + n - 1), r, s * L + n - 1)
        pos = torch.arange(L).expand(S, L).contiguous()
        mask = am
    elif packing == "padding_free":
        flat, pos_l, off = [], [], 0
        for s, (p, r) in enumerate(seqs):
            n = len(p) + len(r)
            flat.extend(p + r)
            pos_l.extend(range(n))
            add(s, range(off + len(p) - 1, off + n - 1), r, off + n - 1)
            off += n
        ids, pos = torch.tensor([flat]), torch.tensor([pos_l])
        mask = _block_causal_mask([len(p) + len(r) for p, r in seqs], mask_dtype)
    elif packing == "shared_prompt":
        # pass 1: [prompt (left-padded to Pm), chosen, pad] per pair; pass 2: [rejected, pad] on
        # top of pass 1's KV cache cropped to the Pm prompt columns
        B = S // 2
        if any(len(examples[i].responses) != 2 or examples[i].desirable is not None
               for i in indices):
            raise ValueError("packing shared_prompt needs pairs (two responses per prompt)")
        Pm = max(len(seqs[i][0]) for i in range(B))
        L1 = Pm + max(len(seqs[i][1]) for i in range(B))
        L2 = max(1, max(len(seqs[B + i][1]) for i in range(B)))
        ids = torch.full((B, L1), pad_id, dtype=torch.long)
        pos = torch.zeros(B, L1, dtype=torch.long)
        am = torch.zeros(B, L1, dtype=torch.long)
        ids2 = torch.full((B, L2), pad_id, dtype=torch.long)
        pos2 = torch.zeros(B, L2, dtype=torch.long)
        am2 = torch.zeros(B, Pm + L2, dtype=torch.long)
        for i in range(B):
            (p, c), (_, r) = seqs[i], seqs[B + i]
            P, C, R = len(p), len(c), len(r)
            ids[i, Pm - P:Pm + C] = torch.tensor(p + c)
            pos[i, Pm - P:Pm + C] = torch.arange(P + C)
            am[i, Pm - P:Pm + C] = 1
            am2[i, Pm - P:Pm] = 1
            if R:
                ids2[i, :R] = torch.tensor(r)
                pos2[i, :R] = torch.arange(P, P + R)
                am2[i, Pm:Pm + R] = 1
            last_prompt = i * L1 + Pm - 1
            add(i, ([last_prompt] + list(range(i * L1 + Pm, i * L1 + Pm + C - 1))) if C else [],
                c, i * L1 + Pm + C - 1)
            off2 = B * L1 + i * L2                     # pass 2's positions follow pass 1's
            add(B + i, ([last_prompt] + list(range(off2, off2 + R - 1))) if R else [], r,
                off2 + R - 1 if R else last_prompt)
        mask, second = am, (ids2, pos2, am2, Pm)
    else:
        raise ValueError(f"packing must be padded, padding_free or shared_prompt; got {packing!r}")
    return Batch(ids, pos, mask, torch.tensor(gather, dtype=torch.long),
                 torch.tensor(labels, dtype=torch.long), torch.tensor(segs, dtype=torch.long),
                 S, tokens, ref_index, len(indices), torch.tensor(last, dtype=torch.long),
                 *second)


def pad_id_of(tokenizer) -> int:
    """The pad token, else EOS, else 0 (padding is never attended to nor scored)."""
    return next(int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
                if t is not None)


__all__ = ["Batch", "collate", "sequences_of", "pad_id_of"]
