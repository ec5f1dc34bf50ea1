"""Per-token log-probs from a transformers CausalLM without its logits, safe under sharding.

``fused_forward(model, ..., labels=...)`` runs the model body, then alignkit's fused LM-head op
on the positions whose next-token label is not -100. It returns a ``FusedOutput`` whose per-token
fields have shape [B, L-1] (label t+1 scored from position t, as HF's loss shifts; or [B, L] with
``shift_labels``) and are 0.0 where the label is ignored.

The gather hook: the op runs *inside the LM head module's own call* (``head(hidden)`` with its
``forward`` swapped for the op for that one call). Whatever gathers a sharded head around its
forward and backward -- FSDP2 on a separately wrapped head, DeepSpeed ZeRO-3's module hooks, the
stand-in in tests/test_integrations_sharded.py -- therefore runs around ours too; reading
``lm_head.weight`` directly, as Liger's drop-in did, sees ZeRO-3's empty partition. A head left
as FSDP2's sharded DTensor (root group read outside the root's forward) is gathered with
full_tensor(); any other DTensor head is tensor parallel, split over the vocabulary, and
goes to the op as it is (alignkit/ops/vocab_parallel.py): it is never gathered, except for
log_sum_sq_probs and soft-capped mean_logits, which need every logit (with a warning).

``patch_model(model)`` installs this as the model's forward for calls that pass ``labels``
(generation, which passes none, is untouched); as a context manager it removes itself on exit.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from alignkit.losses import preference_loss
from alignkit.losses.sft import sft_loss_tokens
from alignkit.model.heads import head_options, match_head_dtypes
from alignkit.ops.linear_logprobs import linear_logprobs_stats
from alignkit.ops.options import LogprobArgs, TileOptions
from alignkit.ops.vocab_stats import vocab_row_stats
from alignkit.ops.vocab_shard import is_dtensor, vocab_mean

try:       # a transformers ModelOutput, so that hooks that walk outputs (ZeRO-3's) see the tensors
    from transformers.utils import ModelOutput as _OutputBase
except ImportError:                            # pragma: no cover - transformers is optional here
    _OutputBase = object


@dataclass
class FusedOutput(_OutputBase):
    """Per-token fields [B, L-1] (0 at ignored labels). mean_logits: mean over the vocabulary of
    the (soft-capped, temperature-scaled) logits; log_sum_sq_probs: log Σ_v p_v² (WPO's weight);
    is_top1: the label is the argmax. loss: mean NLL over the labelled tokens (or over
    num_items_in_batch)."""
    loss: Optional[Tensor] = None
    log_probs: Optional[Tensor] = None
    label_mask: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logits: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    metrics: Optional[dict] = None


def _set_forward(obj, fn):
    """Sets ``obj.forward`` (an instance attribute); returns a function that restores the old."""
    had, prev = "forward" in obj.__dict__, obj.__dict__.get("forward")
    obj.forward = fn

    def restore():
        if had:
            obj.forward = prev
        else:
            del obj.forward
    return restore


def _head_call(head, fn, *args):
    """fn(weight, bias, *args) inside head.__call__, so the head's gather hooks run around it."""
    restore = _set_forward(head, lambda *a: fn(head.weight, head.bias, *a))
    try:
        return head(*args)
    finally:
        restore()


def _full(t):
    """A DTensor head gathered whole: only FSDP2's sharded parameter (data-parallel shards, not
    a vocab split; see _head_tensors) and for an option that truly needs every logit (then with
    a warning)."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _fsdp_shard(model, t) -> bool:
    """Whether t is a parameter FSDP2 holds sharded over data-parallel ranks (its sharded
    DTensor: a head in an FSDP group read outside that group's forward). A head that FSDP2 does
    not manage (FSDP2 on the body only), or that it has unsharded for its forward (the TP
    DTensor of FSDP2 + TP), is not."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                          # pragma: no cover - torch without FSDP2
        return False
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        try:
            group = m._get_fsdp_state()._fsdp_param_group
            params = group.fsdp_params if group is not None else ()
        except AttributeError:                   # FSDP2's internals moved: gather, as before
            return True
        if any(p.sharded_param is t for p in params):
            return True
    return False


def _head_tensors(model, weight, bias):
    """The head's weight and bias as the op takes them. A DTensor head that is not FSDP2's shard
    (transformers' tp_plan, torchtitan, a hand-sharded lm_head, FSDP2 on the body only, or the
    TP DTensor FSDP2 + TP unshards for the forward) is passed on as it is: split over the
    vocabulary (Shard(0)), the op runs on each rank's shard with O(tokens) communication
    (alignkit/ops/vocab_parallel.py), never full_tensor(). FSDP2's own sharded parameter holds
    data-parallel shards, whose ranks hold different batches: gathered, as FSDP would."""
    if is_dtensor(weight) and _fsdp_shard(model, weight):
        return _full(weight), _full(bias)
    return weight, bias


def _whole_for(option: str, weight, bias):
    """weight and bias whole for an option that needs every logit of a row in one place; a
    vocab-parallel head is gathered for it, with a warning naming the option."""
    if is_dtensor(weight):
        warnings.warn(f"{option} needs the whole vocabulary's logits in one place: the "
                      "vocab-parallel LM head is gathered (full_tensor) for it", stacklevel=3)
        return _full(weight), _full(bias)
    return weight, bias


def _labelled(labels):
    """(flat indices of the labelled positions, their labels): only these meet the vocabulary."""
    idx = (labels != -100).reshape(-1).nonzero().squeeze(1)
    return idx, labels.reshape(-1).index_select(0, idx)


def _head_rows(model, weight, bias, h, idx):
    """Inside the head's call: the head's weight and bias (_head_tensors: a vocab-parallel
    DTensor stays sharded), the labelled rows of hidden, all in the dtypes the op meets them
    in."""
    weight, bias = _head_tensors(model, weight, bias)
    hs, weight, bias = match_head_dtypes(h.reshape(-1, h.shape[-1]), weight, bias)
    return hs.index_select(0, idx), weight, bias


def head_logprobs(model, hidden: Tensor, labels: Tensor, *, entropy=False, mean_logits=False,
                  is_top1=False, log_sum_sq_probs=False, temperature: float = 1.0,
                  backend: str = "auto", head_fp32: bool = False,
                  tiles: Optional[TileOptions] = None):
    """hidden [B, T, H], labels [B, T] aligned (label t scored from hidden t; -100 ignored) ->
    dict of per-token [B, T] fields (0 where ignored). Only labelled rows meet the vocabulary.
    mean_logits under a soft cap, and log_sum_sq_probs, cost one more forward GEMM over those
    rows (alignkit.ops.vocab_stats). head_fp32: the head's GEMMs in fp32 with autocast
    off (TRL's cast_lm_head_to_fp32), hidden, weight and bias cast to fp32. tiles:
    alignkit.TileOptions, the engine's options."""
    head = model.get_output_embeddings()
    opts_kw = head_options(model, temperature)
    mask = labels != -100
    idx, y = _labelled(labels)
    opts = LogprobArgs(ignore_index=-100, return_entropy=entropy, backend=backend,
                          tiles=tiles or TileOptions(), **opts_kw)

    def op(weight, bias, h):
        if head_fp32:
            weight, bias = _head_tensors(model, weight, bias)
            weight, bias = weight.float(), (bias.float() if bias is not None else None)
        rows, weight, bias = _head_rows(model, weight, bias, h, idx)
        lp, ent, lse = linear_logprobs_stats(rows, weight, y, bias=bias, opts=opts)
        out = {"log_probs": lp, "entropy": ent}
        if is_top1:
            out["is_top1"] = (lp.detach() + lse[:, 1]) >= 0
        capped_mean = mean_logits and opts.softcap is not None
        if capped_mean or log_sum_sq_probs:
            w_all, b_all = _whole_for("log_sum_sq_probs" if log_sum_sq_probs else
                                      "mean_logits under a soft cap", weight, bias)
            out.update(vocab_row_stats(rows, w_all, b_all, temperature=opts.temperature,
                                       softcap=opts.softcap, lse=lse[:, 0] + lse[:, 1],
                                       mean=capped_mean, sum_sq=log_sum_sq_probs))
        if mean_logits and not capped_mean:
            with torch.no_grad():
                # fp32 means without an fp32 copy of a bf16 weight
                wbar, bbar = vocab_mean(weight, bias)
                ml = rows.float() @ wbar + bbar
                out["mean_logits"] = ml * (1.0 / opts.temperature)
        return out

    if head_fp32:
        hidden = hidden.float()
        with torch.autocast(hidden.device.type, enabled=False):
            flat = _head_call(head, op, hidden)
    else:
        flat = _head_call(head, op, hidden)

    def scatter(x, dtype=torch.float32):
        if x is None:
            return None
        z = torch.zeros(mask.numel(), dtype=dtype, device=hidden.device)
        if idx.numel():
            return z.index_copy(0, idx, x.to(dtype)).view(mask.shape)
        z = z.view(mask.shape)
        # an all-masked batch: a differentiable zero keeps the graph (float fields only; is_top1
        # stays bool)
        return z + 0 * hidden.sum() if dtype.is_floating_point else z
    return dict(log_probs=scatter(flat["log_probs"]), entropy=scatter(flat.get("entropy")),
                mean_logits=scatter(flat.get("mean_logits")),
                log_sum_sq_probs=scatter(flat.get("log_sum_sq_probs")),
                is_top1=scatter(flat.get("is_top1"), torch.bool), label_mask=mask)


def head_preference_loss(model, hidden: Tensor, labels: Tensor, segment_ids: Tensor,
                         num_sequences: int, preference: dict, *, temperature: float = 1.0,
                         backend: str = "auto", tiles: Optional[TileOptions] = None):
    """hidden [B, T, H], labels [B, T] aligned (-100 ignored), segment_ids [B, T] (the sequence
    of each labelled token, chosen 0..B'-1 then rejected) -> (loss, metrics) of
    ``alignkit.preference_loss`` on the labelled rows, inside the head's call (so sharded heads
    are gathered around it). ``preference``: loss=..., ref_logprobs=..., and the loss's options."""
    head = model.get_output_embeddings()
    opts_kw = {k: v for k, v in head_options(model, temperature).items() if v is not None}
    idx, y = _labelled(labels)
    seg = segment_ids.reshape(-1).index_select(0, idx)

    def op(weight, bias, h):
        rows, weight, bias = _head_rows(model, weight, bias, h, idx)
        return preference_loss(rows, weight, y, bias=bias, segment_ids=seg,
                               num_segments=num_sequences, backend=backend, tiles=tiles,
                               **opts_kw, **preference)
    return _head_call(head, op, hidden)


def head_sft_loss(model, hidden: Tensor, labels: Tensor, sft: dict, *, temperature: float = 1.0,
                  backend: str = "auto", tiles: Optional[TileOptions] = None):
    """hidden [B, T, H], labels [B, T] aligned (-100 ignored) -> (loss, entropy [B, T],
    is_top1 [B, T], label_mask) of ``alignkit.sft_loss`` on the labelled rows, inside the head's
    call (sharded heads gathered around it). ``sft``: sft_loss's options (label_smoothing,
    num_items, ...); the model's soft cap and logit scale come from its config."""
    head = model.get_output_embeddings()
    opts_kw = head_options(model, temperature)
    mask = labels != -100
    idx, y = _labelled(labels)

    def op(weight, bias, h):
        rows, weight, bias = _head_rows(model, weight, bias, h, idx)
        # sft_loss has no vocab-parallel pass (its Σz and lse would need the sharded merge too)
        weight, bias = _whole_for("sft_loss", weight, bias)
        return sft_loss_tokens(rows, weight, y, bias=bias, backend=backend, tiles=tiles,
                               **opts_kw, **sft)
    loss, _, ent, top1 = _head_call(head, op, hidden)

    def scatter(x, dtype):
        z = torch.zeros(mask.numel(), dtype=dtype, device=hidden.device)
        return z.index_copy(0, idx, x.to(dtype)).view(mask.shape)
    return loss, scatter(ent, torch.float32), scatter(top1, torch.bool), mask


OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _check_outputs(outputs):
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise NotImplementedError(f"per-token output(s) {sorted(unknown)} are not computed by "
                                  f"alignkit (it serves {', '.join(OUTPUTS)})")


def fused_forward(model, *args, labels=None, shift_labels=None, num_items_in_batch=None,
                  outputs=("log_probs",), temperature: float = 1.0, backend: str = "auto",
                  preference: Optional[dict] = None, head_fp32: bool = False,
                  tiles: Optional[TileOptions] = None, sft: Optional[dict] = None,
                  **kwargs) -> FusedOutput:
    """Body, then the fused head: per-token fields of the next-token labels (see module doc).
    With ``preference`` (dict: sequence_ids [B, T] aligned with the shifted labels,
    num_sequences, and preference_loss's loss=..., ref_logprobs=..., options), the preference
    loss through alignkit's fused engine instead: FusedOutput(loss=..., metrics=...). With
    ``sft`` (alignkit.sft_loss's options: label_smoothing, z_loss, loss_type, num_items), the
    SFT loss: FusedOutput(loss=..., entropy, is_top1, label_mask), the per-token metrics
    detached."""
    _check_outputs(outputs)
    if kwargs.get("output_router_logits"):
        raise NotImplementedError("output_router_logits (MoE load-balancing loss) is not served by "
                                  "alignkit's fused forward")
    kwargs["use_cache"] = False
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    hidden = body(*args, **kwargs).last_hidden_state
    if shift_labels is None:
        if labels is None:
            raise ValueError("fused_forward needs labels [B, L] (or shift_labels)")
        hidden, lab = hidden[:, :-1], labels[:, 1:]
    else:
        lab = shift_labels
    if lab.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:2])} (shift_labels: "
                         f"{tuple(hidden.shape[:-1])}); got {tuple(lab.shape)}")
    if preference is not None:
        pref = dict(preference)
        seq, S = pref.pop("sequence_ids"), pref.pop("num_sequences")
        loss, metrics = head_preference_loss(model, hidden, lab.to(hidden.device), seq, S, pref,
                                             temperature=temperature, backend=backend,
                                             tiles=tiles)
        return FusedOutput(loss=loss, metrics=metrics)
    if sft is not None:
        if head_fp32:
            raise NotImplementedError("the fused SFT loss with head_fp32 is not served")
        loss, ent, top1, mask = head_sft_loss(model, hidden, lab.to(hidden.device), sft,
                                              temperature=temperature, backend=backend,
                                              tiles=tiles)
        return FusedOutput(loss=loss, entropy=ent, is_top1=top1, label_mask=mask)
    f = head_logprobs(model, hidden, lab.to(hidden.device), entropy="entropy" in outputs,
                      mean_logits="mean_logits" in outputs, is_top1="is_top1" in outputs,
                      log_sum_sq_probs="log_sum_sq_probs" in outputs,
                      temperature=temperature, backend=backend, head_fp32=head_fp32,
                      tiles=tiles)
    n = f["label_mask"].sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -f["log_probs"].sum() / n
    return FusedOutput(loss=loss, **f)


def install_fused_forward(model, *, outputs=("log_probs",), temperature: float = 1.0,
                          backend: str = "auto", on: str = "labels", head_fp32: bool = False,
                          tiles: Optional[TileOptions] = None):
    """Makes ``model.forward`` answer with ``fused_forward`` when called with labels
    (``on="labels"``) or with ``fused_lm_head=True`` (``on="fused_lm_head"``, TRL's call); every
    other call goes to the forward the model had. Returns a function that restores that forward.
    The patched forward is what DDP / FSDP2 wrappers call, so they keep working. head_fp32: the
    head in fp32 outside autocast (TRL's cast_lm_head_to_fp32). Unsupported heads and outputs
    are refused here, before the first forward."""
    head_options(model, temperature)                      # refuse unsupported heads now
    _check_outputs(outputs)
    original = model.forward

    def forward(self, *args, fused_lm_head=None, labels=None, shift_labels=None,
                num_items_in_batch=None, alignkit_preference=None, alignkit_sft=None, **kw):
        if on == "fused_lm_head":
            fused = bool(fused_lm_head)
        else:
            fused = labels is not None or shift_labels is not None
            if fused_lm_head is not None:
                kw["fused_lm_head"] = fused_lm_head
        if fused or alignkit_preference is not None or alignkit_sft is not None:
            return fused_forward(self, *args, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, outputs=outputs,
                                 temperature=temperature, backend=backend,
                                 preference=alignkit_preference, head_fp32=head_fp32,
                                 tiles=tiles, sft=alignkit_sft, **kw)
        for k, v in (("labels", labels), ("shift_labels", shift_labels),
                     ("num_items_in_batch", num_items_in_batch)):
            if v is not None:
                kw[k] = v
        return original(*args, **kw)
    return _set_forward(model, types.MethodType(forward, model))


class patch_model:
    """``patch_model(model, entropy=False, temperature=1.0)``: ``model(input_ids, labels=labels,
    ...)`` returns a FusedOutput (per-token ``log_probs`` [B, L-1], ``entropy`` if asked, ``loss``)
    instead of logits; calls without labels run the original forward. The model is patched in
    place; the returned handle's ``unpatch()`` restores it, and as a context manager
    (``with patch_model(model) as m: ...``, m being the model) so does leaving the block.
    Works through DDP / FSDP2 wrappers (the patched forward is what they call)."""

    def __init__(self, model, *, entropy: bool = False, temperature: float = 1.0,
                 backend: str = "auto", tiles: Optional[TileOptions] = None):
        self.model = model
        self.unpatch = install_fused_forward(
            model, outputs=("log_probs", "entropy") if entropy else ("log_probs",),
            temperature=temperature, backend=backend, tiles=tiles)

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        self.unpatch()
        return False
