"""Varlen attention for the trainer's packed rows: each sequence attends to itself alone, with no
[N, N] mask, registered with transformers' attention interface.

Two implementations, one function:
- ``alignkit_varlen`` (any device): ``F.scaled_dot_product_attention(is_causal=True)`` one
  sequence at a time. Memory O(N) (the CPU and CUDA flash kernels keep no [L, L] scores), time
  Σ L_s² instead of N², and no 4·N² bytes of mask (against SDPA with the dense block-causal mask:
  ``bench.long_sequences synthetic``, bench/RESULTS.md per machine class).
- ``alignkit_fa_varlen`` (CUDA, ``pip install alignkit[gpu]``): flash-attn's
  ``flash_attn_varlen_func`` over the whole row with cumulative sequence lengths (``cu_seqlens``,
  int32 [S+1]) — how TRL, LLaMA-Factory and verl run packed rows. The queries are the row
  itself; shared_prompt's keys and values are gathered [prompt, response] per sequence, with
  their own cumulative lengths (flash-attn aligns the causal mask at the bottom right where a
  sequence has fewer queries than keys), so no prompt query runs twice.

The layout (``VarlenLayout``) reaches the attention as a keyword argument of the body's call
(``alignkit_layout=``), which transformers passes down to every attention call. Without it (the
model's own forward, ``generate``), both names behave as ``sdpa``: their mask function is
``sdpa_mask``. Softcapped attention (Gemma 2) takes an exact per-sequence math path.

shared_prompt's pairs are one sequence [prompt, chosen, rejected] in the row, positions
[0 .. P+C-1, P .. P+R-1]. Its attention runs two causal sequences, [prompt, chosen] and
[prompt, rejected], so both responses see the prompt and not each other, and the prompt's MLP,
norms, projections and attention run once per pair. The rejected response's queries alone attend
over the prompt's keys and values and their own:
- CPU (no dropout, softcap or short sliding window): ``alignkit.model.prefix_attention``, the prompt
  block (no mask) and the response's own causal block as two flash calls merged by their
  log-sum-exp. R·P + R²/2 scores, no mask, at any length.
- otherwise, the prompt's keys and values copied in front of the response's, with the causal mask
  aligned at the bottom right while it fits MASK_BYTES (R·(P + R) scores); past it the prompt's
  queries run a second time with their outputs dropped ((P + R)²/2), where a mask would cost
  more memory than the queries' compute.
flash-attn (CUDA) takes separate query and key lengths and keeps no mask, so there the prompt's
queries always run once (flash-attn >= 2.1 aligns causal at the bottom right).
"""
from __future__ import annotations

import bisect
import importlib.util
import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.model import prefix_attention

# shared_prompt's rejected response off the CPU merge (prefix_attention.applies): its R queries
# alone over [prompt, response] take a bool [R, P + R] bottom-right causal mask, which SDPA saves
# for backward in every layer. Up to 4 MiB of mask (P = R = 1448) they do; past it (long rows,
# where the mask would grow as R·(P + R): 200 MB a layer at P = 16384, R = 8192) the prompt's
# queries run again instead, with no mask, and their outputs are dropped.
MASK_BYTES = 4 << 20
VARLEN = "alignkit_varlen"
FLASH_VARLEN = "alignkit_fa_varlen"     # no "flash" in it: transformers would treat it as its own


@dataclass(frozen=True)
class VarlenLayout:
    """Which positions of a row attend to which.

    pieces: host ints, one (ps, pe, s, e) per attention sequence, in row order of [s, e): the
    sequence's keys are row positions [ps, pe) (a shared prompt; empty when ps == pe) then
    [s, e), its queries [s, e) alone; the [s, e) tile the row. Empty: each row of the batch is
    one causal sequence (right padding is never attended to by a real token, so it needs no
    mask).
    For flash-attn (int32 on the batch's device): cu_seqlens [S+1] and max_seqlen, the
    sequences' cumulative key lengths over index [N'] (the row positions of their keys laid end
    to end; None: the row itself); cu_seqlens_q and max_seqlen_q, those of the queries, which
    are the row itself (None: the same as the keys').
    """
    pieces: tuple = ()
    cu_seqlens: Optional[Tensor] = None
    max_seqlen: int = 0
    index: Optional[Tensor] = None
    cu_seqlens_q: Optional[Tensor] = None
    max_seqlen_q: int = 0

    @staticmethod
    def of(pieces: Sequence[tuple]) -> "VarlenLayout":
        pieces = tuple((int(ps), int(pe), int(s), int(e)) for ps, pe, s, e in pieces)
        ends = [0] + [e for _, _, _, e in pieces]
        for (ps, pe, s, e), end in zip(pieces, ends):
            if s != end or e < s or not 0 <= ps <= pe <= s:
                raise ValueError(f"VarlenLayout pieces must tile the row in order, each (ps, pe, "
                                 f"s, e) with its prompt [ps, pe) before [s, e); got "
                                 f"{(ps, pe, s, e)} after position {end}")
        lengths = [pe - ps + e - s for ps, pe, s, e in pieces]
        index = cu_q = None
        max_q = 0
        if any(pe > ps for ps, pe, _, _ in pieces):
            # an arange per block, not a Python int per position (16k tokens: ~2 ms of a step)
            index = torch.cat([torch.arange(a, b) for ps, pe, s, e in pieces
                               for a, b in ((ps, pe), (s, e))])
            q_lengths = [e - s for _, _, s, e in pieces]
            cu_q, max_q = _cumulative(q_lengths), max(q_lengths)
        return VarlenLayout(pieces, _cumulative(lengths), max(lengths, default=0), index, cu_q,
                            max_q)

    @staticmethod
    def of_lengths(lengths: Sequence[int]) -> "VarlenLayout":
        """Sequences of these lengths end to end in one row (padding_free)."""
        pieces, s = [], 0
        for n in lengths:
            pieces.append((s, s, s, s + n))
            s += n
        return VarlenLayout.of(pieces)

    def to(self, device, non_blocking: bool = False) -> "VarlenLayout":
        """A copy with its tensors on ``device`` (as Tensor.to)."""
        move = {k: getattr(self, k).to(device, non_blocking=non_blocking)
                for k in ("cu_seqlens", "index", "cu_seqlens_q") if getattr(self, k) is not None}
        return replace(self, **move)


def _cumulative(lengths: Sequence[int]) -> Tensor:
    """[0, l0, l0 + l1, ...] as int32 (flash-attn's cu_seqlens)."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32)


def _math(q, k, v, scaling, softcap, window, dropout, mask=None):
    """Eager attention for one sequence [B, Hq, L, D] (Gemma 2's softcap and sliding window): the
    scores exist for this sequence only. mask: a bool [.., L, Lk] (True attends) or None for
    causal (with the window)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is None:
        Lq, Lk = s.shape[-2:]
        i = torch.arange(Lq, device=s.device)[:, None] + (Lk - Lq)
        j = torch.arange(Lk, device=s.device)[None]
        mask = j <= i
        if window is not None:
            mask = mask & (i - j < window)
    elif mask.dtype != torch.bool:              # an additive float mask
        s = s + mask
        mask = None
    if mask is not None:      # the dtype's min, not -inf: a padding query that sees no key gets
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)   # a uniform row, not NaN (eager's way)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        p = F.dropout(p, p=dropout, training=True)
    return torch.matmul(p, v)


def _causal(q, k, v, scaling, softcap, window, dropout):
    """One causal sequence (or a batch of right-padded rows) q [B, Hq, Lq, D], k and v
    [B, Hkv, Lk, D] -> [B, Hq, Lq, D]. Lq < Lk: the queries are the last Lq positions of the
    sequence (causal aligned at the bottom right: query i sees keys up to Lk − Lq + i)."""
    Lq, Lk = q.shape[2], k.shape[2]
    if softcap is not None or (window is not None and window < Lk):
        return _math(q, k, v, scaling, softcap, window, dropout)
    gqa = q.shape[1] != k.shape[1]
    if Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                              scale=scaling, enable_gqa=gqa)
    # bottom-right causal takes an explicit mask: SDPA's is_causal aligns top-left
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          scale=scaling, enable_gqa=gqa)


def _flash(q, k, v, layout, scaling, softcap, window, dropout):
    """flash-attn over the packed row: q [1, Hq, N, D] -> [1, N, Hq, D]."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    kw = dict(dropout_p=dropout, softmax_scale=scaling, causal=True,
              window_size=(window - 1, 0) if window is not None else (-1, -1),
              softcap=0.0 if softcap is None else softcap)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # [B, L, H, D]
    if not layout.pieces:
        return flash_attn_func(q, k, v, **kw)
    q, k, v = (t[0] for t in (q, k, v))                        # [N, H, D]
    cu_q, max_q = layout.cu_seqlens, layout.max_seqlen
    if layout.index is not None:      # shared prompts: each sequence's keys [prompt, response];
        k, v = (t.index_select(0, layout.index) for t in (k, v))   # its queries the response's
        cu_q, max_q = layout.cu_seqlens_q, layout.max_seqlen_q     # (causal at the bottom right)
    out = flash_attn_varlen_func(q, k, v, cu_q, layout.cu_seqlens, max_q, layout.max_seqlen,
                                 **kw)
    return out[None]


def varlen_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                     dropout: float = 0.0, scaling: Optional[float] = None,
                     sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                     alignkit_layout: Optional[VarlenLayout] = None, kernel: str = "sdpa",
                     **kwargs):
    """transformers' attention signature: query [B, Hq, L, D], key/value [B, Hkv, L, D] ->
    ([B, L, Hq, D], None)."""
    if not module.training:
        dropout = 0.0
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    layout = alignkit_layout
    if layout is None:                                  # the model's own call: sdpa semantics
        if softcap is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling,
                                          sliding_window=sliding_window, **kwargs)
        mask = attention_mask[:, :, :, :key.shape[2]] if attention_mask is not None else None
        out = _math(query, key, value, scaling, softcap, sliding_window, dropout, mask)
        return out.transpose(1, 2).contiguous(), None
    if kernel == "flash":
        return _flash(query, key, value, layout, scaling, softcap, sliding_window, dropout), None
    if not layout.pieces:
        out = _causal(query, key, value, scaling, softcap, sliding_window, dropout)
        return out.transpose(1, 2).contiguous(), None
    # the pieces' queries, keys and values as one split of the row each: split's backward lays
    # the pieces' gradients end to end in one copy, where a slice per piece zero-filled a whole
    # row per piece and summed them (O(S·N) for padding_free's S sequences; bench/HISTORY.md,
    # "shared_prompt's rejected response merged over its prompt")
    starts = [s for _, _, s, _ in layout.pieces]
    sizes = [e - s for _, _, s, e in layout.pieces]
    qs, ks, vs = (t.split(sizes, 2) for t in (query, key, value))
    outs = []
    for i, (ps, pe, s, e) in enumerate(layout.pieces):
        if pe > ps:       # [prompt, response]: the response's queries over the prompt's keys and
            j = bisect.bisect_right(starts, ps) - 1      # values (within an earlier piece: its
            if j >= 0 and pe <= starts[j] + sizes[j]:    # [prompt, chosen]) and its own
                prompt = [t[j].narrow(2, ps - starts[j], pe - ps) for t in (qs, ks, vs)]
            else:
                prompt = [t[:, :, ps:pe] for t in (query, key, value)]
            if prefix_attention.applies(qs[i], dropout, softcap, sliding_window,
                                        pe - ps + e - s):
                # CPU: the prompt block and the response's own causal block, merged by their
                # log-sum-exp (alignkit.model.prefix_attention): no mask, no prompt query again
                outs.append(prefix_attention.prefix_causal(qs[i], prompt[1], prompt[2], ks[i],
                                                           vs[i], scaling))
                continue
            k, v = (torch.cat([pt, t[i]], 2) for pt, t in zip(prompt[1:], (ks, vs)))
            if (e - s) * k.shape[2] <= MASK_BYTES:
                outs.append(_causal(qs[i], k, v, scaling, softcap, sliding_window, dropout))
                continue
            # past the mask budget the prompt's queries run too (plain causal, no mask) and
            # their outputs are dropped
            q = torch.cat([prompt[0], qs[i]], 2)
            outs.append(_causal(q, k, v, scaling, softcap, sliding_window, dropout)[:, :, pe - ps:])
        else:
            outs.append(_causal(qs[i], ks[i], vs[i], scaling, softcap, sliding_window, dropout))
    # one copy: the pieces' [1, Hq, L, D] outputs, each viewed [1, L, Hq, D], laid end to end
    # (a cat along the sequence then .transpose().contiguous() copied the row twice)
    return torch.cat([o.transpose(1, 2) for o in outs], dim=1), None


def _flash_varlen_attention(*args, **kwargs):
    return varlen_attention(*args, kernel="flash", **kwargs)


def flash_attn_missing() -> Optional[str]:
    """Why flash-attn's varlen kernel cannot run here, or None."""
    if not torch.cuda.is_available():
        return "flash-attn runs on CUDA only and no CUDA device is visible"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install 'alignkit[gpu]')"
    return None


def register() -> None:
    """Registers both names with transformers (idempotent): attention functions, and sdpa's
    mask function for the calls that carry no layout."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionInterface.register(FLASH_VARLEN, _flash_varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    AttentionMaskInterface.register(FLASH_VARLEN, sdpa_mask)


def uses_varlen(model) -> bool:
    """Whether the model's attention takes a VarlenLayout (one of the two names above)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in (
        VARLEN, FLASH_VARLEN)


def require_varlen(model) -> None:
    """Raises ValueError unless the model's attention reads a VarlenLayout: any other would
    ignore it and attend across the packed sequences."""
    if not uses_varlen(model):
        have = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(f"a varlen layout (alignkit_layout) needs the model's attn_implementation "
                         f"to be {VARLEN} or {FLASH_VARLEN} (alignkit.model.attention.register(), then "
                         f"model.set_attn_implementation({VARLEN!r})); {type(model).__name__} "
                         f"has {have!r}, which would ignore it and attend across sequences")


__all__ = ["VarlenLayout", "varlen_attention", "register", "uses_varlen", "require_varlen",
           "flash_attn_missing",
           "VARLEN", "FLASH_VARLEN"]
