"""The fused log-prob op on a vocab-parallel LM head (alignkit/ops/vocab_shard.py: the layouts and
the merge), with O(tokens) communication and no gather of the weight.

    forward   each rank folds its shard's logits tiles (the recompute's kernels,
              alignkit/ops/tile_kernels.py) into per-token (m_r, s_r, a_r, t_r); one all-reduce MAX
              of [M] and one all-reduce SUM of [M, 2] ([M, 3] with entropy) merge them into the
              whole vocabulary's logp, entropy and lse (M: the labelled tokens; 12 bytes a token,
              16 with entropy).
    backward  each rank forms G = dL/dz on its shard from the merged lse and entropy
              (tile_kernels' grad, the label's one-hot where it falls in the shard) and writes
              its own shard of grad_W (and grad_b) with no communication; grad_h = Σ_r G_r·W_r is
              one all-reduce SUM of [N, H] fp32.

Nothing of size V × H or N × V crosses ranks. Per-rank memory: the local W_r and grad_W_r
(V/p rows), grad_h, one tile (TileOptions.tile_bytes), and O(N) statistics.

Every rank of the group must call the op with the same hidden and labels (tensor parallelism:
the activations are replicated), and all must run the backward. The losses built on the per-token
log-probs (preference_loss's and policy_loss's recompute plan, sequence_logprobs, KTO on them)
take this path; the single passes need full-vocabulary tiles and refuse a sharded head
(pass_budget.pass_blocker). Eager only: collectives inside a torch.compile graph are not traced.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from alignkit.ops.backends import gemm_dtype, resolve
from alignkit.ops.linear_logprobs import _chunks, _logits_tile, _plan, backward_impl
from alignkit.ops.options import LogprobArgs, materialize_grads
from alignkit.ops.tile_kernels import KERNELS, RowStats
from alignkit.ops.validate import check_float, check_labels, check_same_device, labelled_rows
from alignkit.ops.vocab_shard import (VocabShard, all_reduce_sum, is_dtensor, local_head,
                                      merge_stats)

# local label values of the shard's backward: ignored, and labelled outside the shard (negative:
# never a column of the shard)
_IGNORED, _ELSEWHERE = -1, -2

CALLS = [0]          # calls of the vocab-parallel forward (tests prove the path ran)


def _backend(opts: LogprobArgs, device) -> str:
    if opts.backend == "triton":
        raise NotImplementedError("backend='triton' does not take a vocab-parallel head (its "
                                  "kernels span the whole vocabulary); use 'auto', 'torch' or "
                                  "'cpp'")
    b = resolve(opts.backend, device)
    return "torch" if b == "triton" else b       # auto on a GPU: the torch tile kernels


def _local_labels(y: Tensor, sh: VocabShard, ignore_index: int) -> Tensor:
    inside = (y >= sh.start) & (y < sh.start + sh.local)
    loc = torch.where(inside, y - sh.start, _ELSEWHERE)
    return torch.where(y == ignore_index, _IGNORED, loc)


def _shard_stats(h2: Tensor, w: Tensor, b: Optional[Tensor], y_loc: Tensor, idx: Tensor,
                 opts: LogprobArgs, backend: str):
    """(m, s, a or None, t) [M] of the labelled rows idx over this rank's shard w [V_r, H]."""
    M, dev = idx.numel(), h2.device
    st = RowStats.new(M, opts.return_entropy, dev)
    Vr, H = w.shape
    if Vr == 0:
        return st
    fold, _ = KERNELS[backend]
    dt = gemm_dtype(w.dtype, w.device)
    p = _plan(M, H, Vr, backend, dt, opts.tiles)
    c0 = 0
    for ic, hc, yc, buf in _chunks(h2, y_loc, idx, p, dt):
        part = RowStats.new(ic.numel(), opts.return_entropy, dev)
        for v0 in range(0, Vr, p.vocab_block):
            v1 = min(Vr, v0 + p.vocab_block)
            tile, _ = _logits_tile(buf, hc, w, b, v0, v1)
            fold(tile, yc, v0, part, opts)
        sl = slice(c0, c0 + ic.numel())
        st.m[sl], st.s[sl], st.tgt[sl] = part.m, part.s, part.tgt
        if part.a is not None:
            st.a[sl] = part.a
        c0 += ic.numel()
    return st


class _VocabParallelLogprobs(torch.autograd.Function):
    """(hidden [..., H], W_r [V_r, H], b_r [V_r] or None, labels [...]) -> (logp [...],
    entropy [...] or [0], lse2 [..., 2]); gradients for hidden (summed over the group), W_r, b_r."""

    @staticmethod
    def forward(ctx, hidden, w, b, labels, sh: VocabShard, opts: LogprobArgs, backend: str):
        CALLS[0] += 1
        H = w.shape[1]
        h2 = hidden.reshape(-1, H)
        y = labels.reshape(-1).long()
        N = y.numel()
        idx = labelled_rows(y, sh.vocab, opts.ignore_index)
        y_loc = _local_labels(y, sh, opts.ignore_index)
        f32 = dict(dtype=torch.float32, device=hidden.device)
        lp, lse = torch.zeros(N, **f32), torch.zeros(N, 2, **f32)
        ent = torch.zeros(N if opts.return_entropy else 0, **f32)
        M = idx.numel()
        if M:           # labels are replicated: every rank has the same M, and all skip or merge
            st = _shard_stats(h2, w, b, y_loc, idx, opts, backend)
            lp_m, ent_m, lse_m = merge_stats(st.m, st.s, st.a, st.tgt, sh.group)
            lp.index_copy_(0, idx, lp_m)
            lse.index_copy_(0, idx, lse_m)
            if opts.return_entropy:
                ent.index_copy_(0, idx, ent_m)
        shape = labels.shape
        lp, lse = lp.view(shape), lse.view(*shape, 2)
        ent = ent.view(shape) if opts.return_entropy else ent
        ctx.save_for_backward(hidden, w, b, y_loc, lse, ent if opts.return_entropy else None)
        ctx.sh, ctx.opts, ctx.backend, ctx.M = sh, opts, backend, M
        ctx.mark_non_differentiable(lse)
        return lp, ent, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_lse):
        hidden, w, b, y_loc, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            b is not None and ctx.needs_input_grad[2]
        g_lp, g_ent = materialize_grads(g_lp, g_ent, lse, ent)
        Vr, H = w.shape
        # grad_h summed in fp32 (or fp64) across ranks, rounded to hidden's dtype after the sum
        acc = hidden if hidden.dtype in (torch.float32, torch.float64) else hidden.float()
        if Vr and ctx.M:
            opts = dataclasses.replace(ctx.opts, ignore_index=_IGNORED)
            gh, gw, gb = backward_impl(g_lp, g_ent, acc, w, y_loc, b, lse.reshape(-1, 2),
                                       ent, opts, ctx.backend, need_h, need_w, need_b, ctx.M)
        else:           # an empty shard, or no labelled token: this rank adds nothing
            gh = torch.zeros_like(acc) if need_h else None
            gw = torch.zeros_like(w) if need_w else None
            gb = torch.zeros_like(b) if need_b else None
        if need_h:
            if ctx.M:
                gh = all_reduce_sum(gh.contiguous(), ctx.sh.group)
            gh = gh.to(hidden.dtype)
        return gh, gw, gb, None, None, None, None


def vocab_parallel_stats(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                         bias: Optional[Tensor], opts: LogprobArgs):
    """linear_logprobs_stats on a vocab-parallel head (a DTensor weight, or a local shard with
    opts.tiles.vocab_group): (logp, entropy or None, lse2 detached), equal on every rank of the
    group, with the whole vocabulary's values. The gradient of a DTensor weight is a DTensor
    sharded like it; of a plain shard, the shard's own."""
    if is_dtensor(hidden) or is_dtensor(labels):
        hidden, labels = _replicated("hidden", hidden), _replicated("labels", labels)
    check_float("hidden", hidden)
    w, b, sh = local_head(weight, bias, opts.tiles)
    check_float("weight", w)
    if bias is not None:
        check_float("bias", b)
    H = w.shape[1]
    if hidden.dim() < 1 or hidden.shape[-1] != H:
        raise ValueError(f"hidden's last dim must equal weight's H={H}, got hidden "
                         f"{tuple(hidden.shape)}")
    check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    check_same_device(hidden=hidden, weight=w, labels=labels, bias=b)
    if sh is None:                   # a replicated DTensor: the whole head, on each rank
        from alignkit.ops.linear_logprobs import linear_logprobs_stats
        return linear_logprobs_stats(hidden, w, labels, bias=b, opts=opts)
    backend = _backend(opts, hidden.device)
    t = opts.tiles.resolved(head=(max(sh.local, 1), H))
    lo = dataclasses.replace(opts, tiles=t)
    lp, ent, lse = _VocabParallelLogprobs.apply(hidden, w, b, labels, sh, lo, backend)
    return lp, (ent if opts.return_entropy else None), lse.detach()


def _replicated(name: str, t):
    if not is_dtensor(t):
        return t
    if any(not pl.is_replicate() for pl in t.placements):
        raise ValueError(f"{name} must be replicated across the vocab-parallel group (a plain "
                         f"tensor, or a DTensor with Replicate placements); got "
                         f"{tuple(t.placements)}")
    return t.to_local()
