"""A transformers model's LM head as alignkit's ops see it: its (body, head) split, the logit
transforms its config asks for, and the dtypes its inputs meet in. Shared by the trainer
(alignkit.train), the drop-ins (alignkit.integrations) and alignkit.rl, which import this module and
not each other.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# head transforms alignkit reproduces; any other logit multiplier in a config is refused
_UNSUPPORTED_SCALES = ("output_multiplier", "lm_head_multiplier")


def head_options(model, temperature: float = 1.0) -> dict:
    """The op options that reproduce the model's own logits: softcap from
    final_logit_softcapping (Gemma 2/3: s·tanh(z/s)), temperature from logits_scaling (Granite,
    z / s) or logit_scale (Cohere, z · s), times the caller's temperature. Any other logit
    multiplier raises NotImplementedError."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    for k in _UNSUPPORTED_SCALES:
        if getattr(cfg, k, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(model).__name__}: config.{k} scales the logits in a "
                                      "way alignkit's head does not reproduce")
    scale = getattr(cfg, "logit_scale", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = (cfg.logits_scaling if cfg.model_type == "hyperclovax"
                 else 1.0 / cfg.logits_scaling)
    scale = 1.0 if scale is None else float(scale)
    if scale <= 0:
        raise NotImplementedError(f"{type(model).__name__}: logit scale {scale} <= 0")
    sc = getattr(cfg, "final_logit_softcapping", None)
    return dict(temperature=float(temperature) / scale, softcap=float(sc) if sc else None)


def match_head_dtypes(h, weight, bias):
    """Under autocast, hidden, weight and bias in the autocast dtype; else hidden in the weight's."""
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        return h.to(dt), weight.to(dt), (bias.to(dt) if bias is not None else None)
    return (h.to(weight.dtype) if h.dtype != weight.dtype else h), weight, bias


class ModelError(ValueError):
    """The model's body or LM head cannot be reached, or its head is not a plain linear map."""


def head_of(model):
    """(body, head module, op options) of a transformers CausalLM."""
    get_dec = getattr(model, "get_decoder", None)
    body = get_dec() if callable(get_dec) else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or not isinstance(head, nn.Module) or \
            not isinstance(getattr(head, "weight", None), Tensor):
        raise ModelError(f"{type(model).__name__}: cannot reach its body (get_decoder()) and LM "
                         "head (get_output_embeddings() with a weight [V, H]); alignkit needs "
                         "both to skip the logits")
    if not isinstance(head, nn.Linear):
        raise ModelError(f"{type(model).__name__}: LM head is {type(head).__name__}, not a "
                         "linear layer")
    try:
        opts = head_options(model)
    except NotImplementedError as e:
        raise ModelError(str(e)) from None
    opts = {k: v for k, v in opts.items() if v is not None and not (k == "temperature" and v == 1.0)}
    return body, head, opts
