"""A transformers model's LM head as alignkit's ops see it: the logit transforms its config asks
for, and the dtypes its inputs meet in. Shared by the trainer (alignkit.train) and the drop-ins
(alignkit.integrations), which import this module and not each other.
"""
from __future__ import annotations

import torch

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
