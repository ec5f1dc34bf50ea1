"""A vocab-parallel LM head: which shard of the vocabulary this rank holds, and the merge of the
per-shard row statistics (alignkit/ops/vocab_parallel.py runs the op on them).

The head W [V, H] (bias [V]) is split over the vocabulary across the p ranks of a process group;
rank r holds rows [start_r, start_r + V_r). Two forms describe it:
    - ``weight`` (and ``bias``) a DTensor with one ``Shard(0)`` placement (a 1-D mesh, or one
      dimension of a 2-D mesh; every other placement ``Replicate``): transformers' TP plans and
      torchtitan hand the head so. Its shards follow torch.chunk: ceil(V/p) rows each, the last
      ones shorter or empty.
    - a plain local shard with ``TileOptions(vocab_group=<ProcessGroup>, vocab_start=None)``
      (Megatron style): start given, or the shards in rank order (their sizes exchanged once).

Merge of one token's per-shard statistics (m_r: the shard's max of z; s_r = Σ_{v∈r} exp(z_v − m_r);
a_r = Σ exp(z_v − m_r)(z_v − m_r); t_r: the label's z where the label falls in shard r, else 0):
    M = max_r m_r                                  all-reduce MAX, 4 bytes a token
    S = Σ_r s_r e^{m_r − M},  T = Σ_r t_r,
    A = Σ_r e^{m_r − M}(a_r + (m_r − M) s_r)       one all-reduce SUM, 8 bytes a token (12 with A)
    lse = M + log S,  logp = (T − M) − log S,  entropy = log S − A / S
(the single process's own formulas, alignkit/ops/tile_kernels.RowStats, on the merged sums). An
exact log-sum-exp needs the common shift M before the sums: two all-reduces, 12 bytes a token
(16 with entropy), both of [labelled tokens] size. Nothing of size V crosses ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:                                  # pragma: no cover - torch without DTensor
    DTensor = None


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of a vocab-parallel head: its process group, the first vocabulary id of
    its shard, the shard's length and the whole vocabulary's."""
    group: object
    start: int
    local: int
    vocab: int


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_vocab_parallel(weight, tiles) -> bool:
    """Whether the op must take the vocab-parallel path: a DTensor weight, or tiles.vocab_group."""
    return is_dtensor(weight) or (tiles is not None and tiles.vocab_group is not None)


def shard_dim(t) -> Optional[int]:
    """The mesh dimension of a DTensor's one Shard(0) placement, None where it has none (all
    Replicate); anything else (Partial, a shard of another dim, two shards) raises."""
    dims = []
    for d, pl in enumerate(t.placements):
        if isinstance(pl, Shard) and pl.dim == 0 and type(pl) is Shard:
            dims.append(d)
        elif not isinstance(pl, Replicate):
            raise ValueError(f"a DTensor LM head must be Shard(0) over the vocabulary on one mesh "
                             f"dimension and Replicate on the others; got placements "
                             f"{tuple(t.placements)}")
    if len(dims) > 1:
        raise ValueError(f"a DTensor LM head is sharded over the vocabulary on one mesh dimension; "
                         f"got Shard(0) on mesh dimensions {dims}")
    return dims[0] if dims else None


def local_head(weight, bias, tiles):
    """(weight, bias, VocabShard or None): the local tensors the op runs on (DTensors become their
    differentiable local shards: grad_W comes back a DTensor sharded like the weight), and the
    shard they hold. None: a DTensor replicated everywhere, run as a whole head. Raises, naming
    the argument, for a layout it cannot serve."""
    group = tiles.vocab_group if tiles is not None else None
    if is_dtensor(weight):
        if group is not None:
            raise ValueError("weight is a DTensor, which names its own process group: "
                             "TileOptions.vocab_group applies to a plain local shard only")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
        d = shard_dim(weight)
        if bias is not None:
            if not is_dtensor(bias) or bias.device_mesh != weight.device_mesh or \
                    tuple(bias.placements) != tuple(weight.placements):
                raise ValueError("with a DTensor weight, bias must be a DTensor on the same mesh "
                                 "with the same placements (Shard(0) over the vocabulary)")
        w_loc, b_loc = weight.to_local(), (bias.to_local() if bias is not None else None)
        if d is None:
            return w_loc, b_loc, None
        mesh = weight.device_mesh
        p, r, V = mesh.size(d), mesh.get_local_rank(d), weight.shape[0]
        chunk = -(-V // p)
        start = min(r * chunk, V)
        local = min(chunk, V - start)
        if w_loc.shape[0] != local:
            raise ValueError(f"weight's local shard has {w_loc.shape[0]} rows where Shard(0) of "
                             f"V={V} over {p} ranks gives rank {r} {local} (torch.chunk)")
        return w_loc, b_loc, VocabShard(mesh.get_group(d), start, local, V)
    if is_dtensor(bias):
        raise ValueError("bias is a DTensor but weight is not")
    if group is None:
        return weight, bias, None
    if not dist.is_initialized():
        raise ValueError("TileOptions.vocab_group is set but torch.distributed is not initialized")
    if weight.dim() != 2:
        raise ValueError(f"weight must be this rank's 2-D shard [V_r, H], got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be this rank's shard [V_r] = ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    start, V = _layout(group, int(weight.shape[0]), tiles.vocab_start, weight.device)
    return weight, bias, VocabShard(group, start, int(weight.shape[0]), V)


_LAYOUTS: dict = {}


def _layout(group, local: int, start: Optional[int], device):
    """(this rank's start, V) of a plain-shard head: one all-gather of (start, length) per group
    and shard, cached (the layout of a head does not change between steps). Given starts must
    tile [0, V) without gap or overlap. The cache is per rank: every rank of a group keeps one
    layout for the group's life (a rank that alone changed its shard would wait on the others
    in this all-gather while they skip it)."""
    key = (group, local, start)
    if key not in _LAYOUTS:
        p = dist.get_world_size(group)
        # gloo takes CPU tensors, nccl the current device's
        dev = device if dist.get_backend(group) != "gloo" else torch.device("cpu")
        mine = torch.tensor([-1 if start is None else start, local], dtype=torch.int64, device=dev)
        every = [torch.empty_like(mine) for _ in range(p)]
        dist.all_gather(every, mine, group=group)
        pairs = [tuple(int(x) for x in t.tolist()) for t in every]
        given = [s for s, _ in pairs]
        if any(s < 0 for s in given) and any(s >= 0 for s in given):
            raise ValueError("vocab_start must be given on every rank of vocab_group or on none")
        if given[0] < 0:
            starts, acc = [], 0
            for _, n in pairs:
                starts.append(acc)
                acc += n
            pairs = list(zip(starts, (n for _, n in pairs)))
        spans = sorted(pairs)
        end = 0
        for s, n in spans:
            if s != end:
                raise ValueError(f"the vocab shards of vocab_group must tile [0, V) without gap or "
                                 f"overlap; got (start, length) per rank {pairs}")
            end = s + n
        _LAYOUTS[key] = (pairs[dist.get_rank(group)][0], end)
    return _LAYOUTS[key]


def comm_device(group, device):
    """Where the group's collectives take their tensors: CPU for gloo, the inputs' device else."""
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else device


def merge_stats(m: Tensor, s: Tensor, a: Optional[Tensor], tgt: Tensor, group):
    """Per-shard row statistics [M] -> (logp [M], entropy [M] or None, lse2 [M, 2]) of the whole
    vocabulary (module docstring): an all-reduce MAX of [M] and an all-reduce SUM of [M, 2]
    ([M, 3] with entropy), fp32."""
    one = dist.get_world_size(group) == 1     # a group of one: the merge is the shard's own
    dev = comm_device(group, m.device)
    big = m.to(dev, copy=True)
    if not one:
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
    big = big.to(m.device)
    live = s > 0                      # an empty shard (m = −inf, s = 0) adds nothing
    scale = torch.where(live, torch.exp(m - big), 0.0)
    cols = [s * scale, tgt]
    if a is not None:
        cols.append(torch.where(live, (a + (m - big) * s) * scale, 0.0))
    sums = torch.stack(cols, 1).to(dev)
    if not one:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    sums = sums.to(m.device)
    log_s = sums[:, 0].log()
    lp = (sums[:, 1] - big) - log_s
    ent = log_s - sums[:, 2] / sums[:, 0] if a is not None else None
    return lp, ent, torch.stack([big, log_s], 1)


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """The backward's grad_h: Σ over the group of every rank's G·W_shard, in place where the
    group's backend takes t's device."""
    if dist.get_world_size(group) == 1:
        return t
    dev = comm_device(group, t.device)
    if dev == t.device:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t
    c = t.to(dev)
    dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
    return c.to(t.device)


def vocab_mean(weight, bias):
    """(mean over the vocabulary of W's rows [H] fp32, of b's entries: a 0-dim tensor or 0.0),
    for the whole head or a vocab-parallel DTensor one: each shard's sums, then one all-reduce of
    H + 1 floats (a DTensor's own mean would average uneven shards' means)."""
    if not is_dtensor(weight):
        return (weight.mean(0, dtype=torch.float32),
                bias.mean(dtype=torch.float32) if bias is not None else 0.0)
    w, b, sh = local_head(weight, bias, None)
    b_sum = b.sum(dtype=torch.float32) if b is not None else w.new_zeros((), dtype=torch.float32)
    sums = torch.cat([w.sum(0, dtype=torch.float32), b_sum.reshape(1)])
    if sh is not None:
        sums = all_reduce_sum(sums, sh.group)
    V = weight.shape[0]
    return sums[:-1] / V, (sums[-1] / V if bias is not None else 0.0)
