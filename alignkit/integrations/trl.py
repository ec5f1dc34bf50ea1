"""``patch_trainer(trainer) -> trainer``: TRL 1.16 trainers' LM head through alignkit.

What changes, per trainer, and why no option can be dropped:
- ``DPOTrainer`` and ``KTOTrainer`` already call ``model(..., labels=..., fused_lm_head=True)``
  and read per-token fields (log_probs, entropy, mean_logits, is_top1). The patch answers that
  call with alignkit's op (only labelled positions meet the vocabulary; TRL's CPU path scores
  every position). TRL's own loss code then runs unchanged, so every ``loss_type``,
  ``loss_weights``, ``label_smoothing``, precomputed reference log-probs and every metric name
  are TRL's by construction.
- ``GRPOTrainer`` and ``RLOOTrainer`` call the same ``fused_lm_head=True`` for the completion
  tokens' log_probs and entropy (the entropy bonus takes its gradient); the patch answers it
  with the trainer's temperature, for the policy and the reference model.
- ``CPOTrainer`` and ``ORPOTrainer`` (``trl.experimental``) build full logits in
  ``concatenated_forward``. The patch replaces that method: one fused call gives the sequence
  log-probs and the NLL term exactly as TRL defines them (ORPO's NLL covers prompt and response,
  CPO's the response), and ``logits/chosen|rejected`` -- means over positions and vocabulary --
  come from hidden · mean(W) + mean(b), which needs no logits. ``get_batch_loss_metrics`` and
  ``cpo_loss`` / ``odds_ratio_loss`` stay TRL's.
- ``SFTTrainer`` calls ``model(..., fused_lm_head=True)`` for log_probs, entropy and is_top1;
  the patch answers it, and TRL's own loss code (``loss_type`` "nll" and "dft",
  ``num_items_in_batch``) and metrics run unchanged. With ``label_smoothing_factor`` TRL instead
  runs a second, full-logits forward for transformers' ``LabelSmoother`` (its comment: "Label
  smoothing needs the full logits"); the patch arms that forward to run the body once and
  ``alignkit.sft_loss(label_smoothing=ε)`` on the fused head (the smoothing's Σ_v z_v is one more
  per-row sum in the pass: no [N, V] logits), and TRL's metrics call that follows gets the same
  call's per-token entropy and is_top1 (no second body forward).
- ``DistillationTrainer``: its chunked divergence (``_chunked_divergence_loss`` and the
  ``ChunkedDivergenceFunction`` inside it) is answered by alignkit.distill_loss, for the patched
  trainer only (alignkit/integrations/trl_distill.py says how, and what it refuses).
- ``GRPOConfig.cast_lm_head_to_fp32=True``: the head's GEMMs run in fp32 with autocast off, as
  TRL's own head does (policy and reference).
- ``DPOConfig.use_weighting=True`` (WPO): the fused output carries ``log_sum_sq_probs``
  (log Σ_v p_v², no gradient) and TRL's loss code weights the pairs. Under
  ``final_logit_softcapping`` (Gemma-2/3) the ``mean_logits`` TRL logs are the mean of the capped
  logits. Both cost one extra forward GEMM over the labelled rows
  (alignkit.ops.vocab_stats says which engine change removes it).
What is refused when patching, naming the option: MoE router logits (``output_router_logits``),
encoder-decoder models, logit multipliers alignkit does not reproduce.
The call goes through ``model(...)``, i.e. through accelerate's DDP / FSDP wrapper, so gradient
sync and parameter gathering are the wrapper's; the head op runs inside the head module's call
(alignkit.integrations.head), so a separately sharded head is gathered too.
"""
from __future__ import annotations

import types

import torch

from alignkit.integrations.head import install_fused_forward
from alignkit.ops.options import TileOptions


def _install(model, outputs, backend="auto", temperature=1.0, head_fp32=False, tiles=None):
    """model(..., fused_lm_head=True) -> alignkit; other calls -> the forward it had."""
    install_fused_forward(model, outputs=outputs, backend=backend, on="fused_lm_head",
                          temperature=temperature, head_fp32=head_fp32, tiles=tiles)
    model._alignkit_forward = model.__dict__["forward"]


def _patched(model) -> bool:
    """alignkit's forward is still the model's: a trainer built later on the same model (TRL
    installs its own fused head in __init__) replaces it, and then it must be patched again."""
    fwd = getattr(model, "_alignkit_forward", None)
    return fwd is not None and model.__dict__.get("forward") is fwd


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_common(trainer):
    if getattr(trainer, "is_encoder_decoder", False):
        raise NotImplementedError("encoder-decoder models are not served by alignkit's drop-in")
    if getattr(trainer, "aux_loss_enabled", False):
        raise NotImplementedError("output_router_logits / aux_loss (MoE) is not served by "
                                  "alignkit's drop-in")


def patch_trainer(trainer, *, backend: str = "auto", tiles=None):
    """Routes a TRL 1.16 trainer's LM head through alignkit's fused op; returns the trainer.
    tiles: alignkit.TileOptions, the engine's options (memory, plan, autotune, budgets)."""
    if tiles is not None and not isinstance(tiles, TileOptions):
        raise TypeError(f"tiles must be an alignkit.TileOptions, got {tiles!r}")
    kw = dict(backend=backend, tiles=tiles)
    from trl import DPOTrainer, KTOTrainer
    names = {c.__name__ for c in type(trainer).__mro__}
    rl = names & {"GRPOTrainer", "RLOOTrainer"}
    if "DistillationTrainer" in names:
        from alignkit.integrations.trl_distill import patch_distillation
        _check_common(trainer)
        return patch_distillation(trainer, **kw)
    if not isinstance(trainer, (DPOTrainer, KTOTrainer)) and not \
            names & {"CPOTrainer", "ORPOTrainer", "SFTTrainer"} and not rl:
        raise TypeError(f"patch_trainer serves TRL's DPOTrainer, KTOTrainer, CPOTrainer, "
                        f"ORPOTrainer, GRPOTrainer, RLOOTrainer, SFTTrainer and "
                        f"DistillationTrainer; got {type(trainer).__name__}")
    if _patched(_base(trainer.model)):
        return trainer
    _check_common(trainer)
    if "SFTTrainer" in names:
        _patch_sft(trainer, kw)
        return trainer
    if rl:
        # TRL's own loss code reads log_probs and entropy (with its gradient: the entropy bonus)
        # of the completion tokens; its temperature divides the logits, as TRL's head does
        t = float(getattr(trainer, "temperature", 1.0))
        # GRPOConfig.cast_lm_head_to_fp32: TRL casts the head module to fp32 and runs its GEMMs
        # outside autocast, for the policy and the reference
        fp32 = bool(getattr(getattr(trainer, "args", None), "cast_lm_head_to_fp32", False))
        _install(_base(trainer.model), ("log_probs", "entropy"), temperature=t, head_fp32=fp32,
                 **kw)
        ref = getattr(trainer, "ref_model", None)
        if ref is not None and not _patched(_base(ref)):
            _install(_base(ref), ("log_probs",), temperature=t, head_fp32=fp32, **kw)
        return trainer
    if isinstance(trainer, DPOTrainer):
        # WPO (use_weighting) reads log_sum_sq_probs, as TRL's own head gives it
        wpo = ("log_sum_sq_probs",) if getattr(trainer, "use_weighting", False) else ()
        _install(_base(trainer.model), ("log_probs", "entropy", "mean_logits", "is_top1") + wpo,
                 **kw)
    elif isinstance(trainer, KTOTrainer):
        _install(_base(trainer.model), ("log_probs", "entropy", "mean_logits"), **kw)
    else:
        orpo = "ORPOTrainer" in names
        _install(_base(trainer.model), ("log_probs", "mean_logits"), **kw)
        trainer.concatenated_forward = types.MethodType(
            _orpo_forward if orpo else _cpo_forward, trainer)
    ref = getattr(trainer, "ref_model", None)
    if ref is not None and not _patched(_base(ref)):
        _install(_base(ref), ("log_probs",), **kw)
    return trainer


def _concat(trainer, batch):
    pad = getattr(trainer, "padding_value", None)          # ORPO has one, CPO pads with pad_token_id
    cb = trainer.concatenated_inputs(batch, is_encoder_decoder=False,
                                     padding_value=trainer.pad_token_id if pad is None else pad,
                                     device=trainer.accelerator.device)
    return cb, batch["chosen_labels"].shape[0]


def _scored_forward(model, ids, attn):
    """One fused call through the (wrapped) model scoring every position t against token t+1
    (the last position against token 0, for its mean logit only): per-token fields [B, L]."""
    shift = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    return model(ids, attention_mask=attn, shift_labels=shift, fused_lm_head=True,
                 use_cache=False)


def _cpo_forward(self, model, batch):
    cb, n = _concat(self, batch)
    ids, attn, labels = (cb["concatenated_input_ids"], cb["concatenated_attention_mask"],
                         cb["concatenated_labels"])
    out = _scored_forward(model, ids, attn)
    resp = torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], 1)
    lp = out.log_probs * resp
    sums, counts = lp.sum(-1), resp.sum(-1)
    logps = sums / counts if self.loss_type in ("ipo", "simpo") else sums
    if self.cpo_alpha == 0:
        nll = torch.tensor(0.0, device=self.accelerator.device)
    else:                                            # CrossEntropyLoss: mean over chosen labels
        nll = -lp[:n].sum() / counts[:n].sum()
    ml = out.mean_logits                             # TRL: all_logits[:n].mean(), all L positions
    return (logps[:n], logps[n:], ml[:n].mean(), ml[n:].mean(), nll)


def _orpo_forward(self, model, batch):
    cb, n = _concat(self, batch)
    ids, attn, labels = (cb["concatenated_input_ids"], cb["concatenated_attention_mask"],
                         cb["concatenated_labels"])
    out = _scored_forward(model, ids, attn)
    lp, ml = out.log_probs[:, :-1], out.mean_logits[:, :-1]   # TRL drops the last position
    full = attn[:, 1:] == 1                          # ORPO's NLL: prompt and response tokens
    resp = labels[:, 1:] != -100
    nll = -(lp[:n] * full[:n]).sum() / full[:n].sum()
    logps = (lp * resp).sum(-1) / resp.sum(-1)
    return (logps[:n], logps[n:], ml[:n].mean(), ml[n:].mean(), nll)


# ---- SFTTrainer ---------------------------------------------------------------------------------

class FusedLabelSmoother:
    """Stands in for transformers' LabelSmoother in a patched SFTTrainer: TRL calls it on the
    output of its full-logits forward, which the patch armed to return alignkit.sft_loss's
    FusedOutput (the smoothed loss, computed without logits). epsilon is the trainer's."""

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def __call__(self, model_output, labels, shift_labels=False, num_items_in_batch=None):
        loss = getattr(model_output, "loss", None)
        if loss is None or getattr(model_output, "logits", None) is not None:
            raise RuntimeError("alignkit's label smoother got a model output that its armed "
                               "forward did not make (TRL's SFTTrainer.compute_loss changed?)")
        return loss


def _patch_sft(trainer, kw):
    args = trainer.args
    base = _base(trainer.model)
    _install(base, ("log_probs", "entropy", "is_top1"), **kw)
    smoother = getattr(trainer, "label_smoother", None)
    if smoother is None or args.loss_type != "nll" or \
            getattr(trainer, "compute_loss_func", None) is not None:
        return          # TRL's fused-head path: its own loss code on our per-token fields
    fused = base.__dict__["forward"]
    arm = {}

    def forward(*a, **k):
        if not arm:
            return fused(*a, **k)
        if k.get("fused_lm_head"):
            # TRL's metrics call after the smoothed loss, under no_grad: the armed call's fields
            out = arm.pop("out", None)
            if out is None:
                raise RuntimeError("alignkit: TRL's metrics call came before the smoothed loss")
            return out
        out = fused(*a, labels=arm["labels"], alignkit_sft=arm["sft"], **k)
        arm["out"] = out
        return out
    base.forward = forward
    base._alignkit_forward = forward
    trainer.label_smoother = FusedLabelSmoother(smoother.epsilon)
    compute_loss = trainer.compute_loss

    def armed_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        arm.update(labels=inputs["labels"],
                   sft=dict(label_smoothing=float(smoother.epsilon), num_items=num_items_in_batch))
        try:
            return compute_loss(model, inputs, return_outputs=return_outputs,
                                num_items_in_batch=num_items_in_batch)
        finally:
            arm.clear()
    trainer.compute_loss = armed_compute_loss
