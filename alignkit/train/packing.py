"""Micro-batches for one forward pass: padded, padding_free and shared_prompt layouts.

Every layout yields the same thing for the loss: ``gather`` [M] (flat indices into the body's
hidden states [rows * L, H]), ``labels`` [M] and ``segment_ids`` [M] in [0, S), for the S
sequences (pairs: chosen 0..B-1, then rejected B..2B-1). Only response tokens are gathered, so
the LM-head GEMMs run over response tokens alone: prompt and padding never meet the vocabulary.
Hidden position t predicts token t+1, so a response of R tokens after a prompt of P tokens
gathers positions P-1 .. P+R-2.

Two attentions (``attention=``), chosen by the model's attn_implementation:

- ``varlen`` (alignkit.model.attention: ``alignkit_varlen`` / ``alignkit_fa_varlen``): no mask at all.
  ``layout`` (a ``VarlenLayout``) says which positions attend to which; ``attention_mask`` is all
  ones (O(N)), so transformers builds no mask either.
  - ``padded``: one row per sequence, right-padded; each row one causal sequence (a real token
    never attends to the padding after it).
  - ``padding_free``: all sequences end to end in one row, ``position_ids`` restarting per
    sequence; attention per sequence (cu_seqlens). Memory O(N), time Σ L_s².
  - ``shared_prompt``: one row of [prompt, chosen, rejected] per pair, positions continuing after
    the prompt for both responses; attention over [prompt, chosen] and [prompt, rejected]. The
    prompt's projections and MLP run once per pair, gradients reach it from both responses, and
    the last prompt position, which predicts the first token of both, is gathered twice. One body
    call, so gradient checkpointing and the tiled MLP apply as to any row.
- ``dense`` (``sdpa``, ``eager``):
  - ``padded``: a 2D attention mask.
  - ``padding_free``: a 4D float block-causal mask [1, 1, N, N] (0 or the dtype's min) keeps each
    sequence to itself (position_ids alone do not, with sdpa or eager attention). It costs 4·N²
    bytes (64 MiB at N=4096) and, with sdpa on CPU, O(N²) time whatever the mask.
  - ``shared_prompt``: two passes of the body. Pass 1 runs [prompt, chosen] per pair, the prompts
    left-padded so that they all end at column Pm; its KV cache, cropped to those Pm columns, is
    the prefix of pass 2, which runs the rejected responses alone. Gather indices of pass 2 follow
    pass 1's (flat index B·L1 + ...). No gradient checkpointing (the cache is off in training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from alignkit.model.attention import VarlenLayout

ATTENTIONS = ("dense", "varlen")


@dataclass
class Batch:
    input_ids: Tensor            # [rows, L]
    position_ids: Tensor         # [rows, L]
    attention_mask: Tensor       # [rows, L], or [1, 1, N, N] float (dense padding_free)
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
    layout: Optional[VarlenLayout] = None      # attention varlen: who attends to whom

    def to(self, device):
        for k in ("input_ids", "position_ids", "attention_mask", "gather", "labels",
                  "segment_ids", "last", "input_ids2", "position_ids2", "attention_mask2",
                  "layout"):
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
            mask_dtype=torch.float32, attention: str = "dense") -> Batch:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be dense or varlen; got {attention!r}")
    varlen = attention == "varlen"
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
        mask, layout = (torch.ones_like(am), VarlenLayout()) if varlen else (am, None)
    elif packing == "padding_free":
        flat, pos_l, off = [], [], 0
        for s, (p, r) in enumerate(seqs):
            n = len(p) + len(r)
            flat.extend(p + r)
            pos_l.extend(range(n))
            add(s, range(off + len(p) - 1, off + n - 1), r, off + n - 1)
            off += n
        ids, pos = torch.tensor([flat]), torch.tensor([pos_l])
        lengths = [len(p) + len(r) for p, r in seqs]
        mask, layout = ((torch.ones_like(ids), VarlenLayout.of_lengths(lengths)) if varlen else
                        (_block_causal_mask(lengths, mask_dtype), None))
    elif packing == "shared_prompt" and varlen:
        B = _pairs_of(examples, indices, S)
        flat, pos_l, pieces = [], [], []
        for i in range(B):
            (p, c), (_, r) = seqs[i], seqs[B + i]
            P, C, R = len(p), len(c), len(r)
            o = len(flat)                             # the pair's row offset
            flat.extend(p + c + r)
            pos_l.extend(list(range(P + C)) + list(range(P, P + R)))
            # attention over [prompt, chosen], and over [prompt, rejected]
            pieces += [(o, o, o, o + P + C), (o, o + P, o + P + C, o + P + C + R)]
            add(i, [o + P - 1] + list(range(o + P, o + P + C - 1)) if C else [], c, o + P + C - 1)
            add(B + i, [o + P - 1] + list(range(o + P + C, o + P + C + R - 1)) if R else [], r,
                o + P + C + R - 1 if R else o + P - 1)
        ids, pos = torch.tensor([flat]), torch.tensor([pos_l])
        mask, layout = torch.ones_like(ids), VarlenLayout.of(pieces)
    elif packing == "shared_prompt":
        # pass 1: [prompt (left-padded to Pm), chosen, pad] per pair; pass 2: [rejected, pad] on
        # top of pass 1's KV cache cropped to the Pm prompt columns
        B = _pairs_of(examples, indices, S)
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
        mask, layout, second = am, None, (ids2, pos2, am2, Pm)
    else:
        raise ValueError(f"packing must be padded, padding_free or shared_prompt; got {packing!r}")
    return Batch(ids, pos, mask, torch.tensor(gather, dtype=torch.long),
                 torch.tensor(labels, dtype=torch.long), torch.tensor(segs, dtype=torch.long),
                 S, tokens, ref_index, len(indices), torch.tensor(last, dtype=torch.long),
                 *second, layout=layout)


def _pairs_of(examples, indices, S) -> int:
    if any(len(examples[i].responses) != 2 or examples[i].desirable is not None
           for i in indices):
        raise ValueError("packing shared_prompt needs pairs (two responses per prompt)")
    return S // 2


def pad_id_of(tokenizer) -> int:
    """The pad token, else EOS, else 0 (padding is never attended to nor scored)."""
    return next(int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
                if t is not None)


__all__ = ["Batch", "collate", "sequences_of", "pad_id_of", "ATTENTIONS"]
