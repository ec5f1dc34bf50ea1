"""TRL 1.16's DistillationTrainer through alignkit.distill_loss (patch_trainer's distillation
half, alignkit/integrations/trl.py).

TRL's ``_compute_loss`` runs both backbones, reads each head's logit scale and softcap from the
configs, and calls the module function ``trl.trainer.distillation_trainer._chunked_divergence_loss``
(hidden states, heads, the completion mask, beta, num_items_in_batch, temperature), which runs
``ChunkedDivergenceFunction`` and returns (loss, entropy sum, valid-token count). The patch
answers that call with alignkit.distill_loss for a patched trainer only: the module function is
replaced once by a dispatcher that calls TRL's own function unless a patched trainer's
``_compute_loss`` is on the stack (a context variable it sets), so an unpatched trainer in the
same process keeps TRL's path. Everything around it (generation, the teacher's forward, the
reduction by num_items_in_batch, the logged entropy) stays TRL's.

The completion mask becomes distill_loss's labels (ignore_index where the mask is 0). A logit
scale (Cohere's logit_scale, Granite's logits_scaling, ...) multiplies the logits before the
temperature: it is folded into the hidden states and bias, scale·(h·Wᵀ + b) = (scale·h)·Wᵀ +
scale·b, with autograd carrying the student's gradient through the product. Refused when patching,
naming the option: ``final_logit_softcapping`` on the student or the teacher (distill_loss has
no softcap), a backend other than "auto" (the divergence has one path).
"""
from __future__ import annotations

import contextvars
import types

import torch

from alignkit.losses.distill import distill_loss

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("alignkit_distill", default=None)
_ORIGINAL = {}


def _softcap(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "final_logit_softcapping", None)


def patch_distillation(trainer, *, backend: str = "auto", tiles=None):
    """Routes ``trainer``'s divergence through alignkit.distill_loss; returns the trainer."""
    if backend != "auto":
        raise ValueError(f"backend={backend!r}: DistillationTrainer's divergence has one path "
                         "(torch GEMMs and elementwise ops on every device); leave backend='auto'")
    teacher = getattr(trainer, "teacher_model", None)
    for who, m in (("student", trainer.model), ("teacher", teacher)):
        if m is not None and _softcap(m) is not None:
            raise NotImplementedError(f"the {who}'s final_logit_softcapping={_softcap(m)} is not "
                                      "served by alignkit.distill_loss (no softcap)")
    if getattr(trainer, "_alignkit_distill", False):
        return trainer
    _hook_module()
    inner = trainer._compute_loss

    def _compute_loss(self, *args, **kwargs):
        token = _ACTIVE.set(tiles if tiles is not None else _DEFAULT)
        try:
            return inner(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
    trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    trainer._alignkit_distill = True
    return trainer


_DEFAULT = object()     # a patched trainer without tiles: distill_loss's defaults


def _hook_module():
    import trl.trainer.distillation_trainer as dt
    if "fn" not in _ORIGINAL:
        _ORIGINAL["fn"] = dt._chunked_divergence_loss
        dt._chunked_divergence_loss = _divergence_loss


def _full(x):
    """A DTensor head (FSDP2) gathered once, as TRL does."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                      # torch built without distributed
        return x
    return x.full_tensor() if isinstance(x, DTensor) else x


def _divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                     teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                     student_lm_head_bias=None, teacher_lm_head_bias=None,
                     student_logit_scale=1.0, teacher_logit_scale=1.0,
                     student_final_logit_softcapping=None, teacher_final_logit_softcapping=None,
                     temperature=1.0):
    """TRL's _chunked_divergence_loss (same arguments, same (loss, entropy_sum, n_valid)) by
    alignkit.distill_loss where a patched trainer called it; TRL's own otherwise."""
    tiles = _ACTIVE.get()
    if tiles is None:
        return _ORIGINAL["fn"](
            student_hidden_states, teacher_hidden_states, student_lm_head_weight,
            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=num_items_in_batch,
            student_lm_head_bias=student_lm_head_bias, teacher_lm_head_bias=teacher_lm_head_bias,
            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
            student_final_logit_softcapping=student_final_logit_softcapping,
            teacher_final_logit_softcapping=teacher_final_logit_softcapping,
            temperature=temperature)
    for who, cap in (("student", student_final_logit_softcapping),
                     ("teacher", teacher_final_logit_softcapping)):
        if cap is not None:
            raise NotImplementedError(f"the {who}'s final_logit_softcapping={cap} is not served "
                                      "by alignkit.distill_loss (no softcap)")
    hs, ws, bs = student_hidden_states, _full(student_lm_head_weight), _full(student_lm_head_bias)
    ht, wt, bt = teacher_hidden_states, _full(teacher_lm_head_weight), _full(teacher_lm_head_bias)
    # under mixed precision a gathered fp32 master copy meets bf16 hidden states (TRL casts too)
    ws, wt = ws.to(hs.dtype), wt.to(ht.dtype)
    bs = None if bs is None else bs.to(ws.dtype)
    bt = None if bt is None else bt.to(wt.dtype)
    if student_logit_scale != 1.0:
        hs = hs * student_logit_scale
        bs = None if bs is None else bs * student_logit_scale
    if teacher_logit_scale != 1.0:
        ht = ht * teacher_logit_scale
        bt = None if bt is None else bt * teacher_logit_scale
    valid = completion_mask != 0
    labels = torch.where(valid, 0, -100).to(torch.long)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(hs.device)
    loss, metrics = distill_loss(hs, ws, ht, wt, labels, beta=float(beta),
                                 temperature=float(temperature), student_bias=bs,
                                 teacher_bias=bt, num_items=num_items_in_batch,
                                 tiles=None if tiles is _DEFAULT else tiles)
    n_valid = valid.sum()
    return loss, metrics["entropy"] * n_valid, n_valid
