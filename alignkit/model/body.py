"""A decoder body run over one of the trainer's layouts (alignkit.train.packing), to flat hidden
states [rows·L (+ B·L2), H]: one call, with the varlen layout passed to the attention when there
is one; dense shared_prompt is two, the second continuing from the first's KV cache cropped to
the prompt columns."""
from __future__ import annotations

import torch
from torch import Tensor

from alignkit.model.attention import require_varlen


class BodyError(ValueError):
    """The body cannot run the layout (no croppable KV cache for shared_prompt)."""


def body_hidden(body, input_ids, position_ids, attention_mask, input_ids2=None,
                position_ids2=None, attention_mask2=None, prefix: int = 0,
                layout=None) -> Tensor:
    two = input_ids2 is not None
    kw = {}
    if layout is not None:
        require_varlen(body)
        kw["alignkit_layout"] = layout
    out = body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
               use_cache=two, **kw)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    if not two:
        return hidden
    cache = out.past_key_values          # shared_prompt: the rejected responses over the prompt
    if cache is None or not hasattr(cache, "crop"):
        raise BodyError(f"{type(body).__name__}: packing shared_prompt needs a croppable KV "
                        "cache from the body (DynamicCache); use padded")
    drop = input_ids.shape[1] - prefix
    if drop:
        cache.crop(-drop)                # transformers 5: a negative count removes columns
    out2 = body(input_ids=input_ids2, position_ids=position_ids2,
                attention_mask=attention_mask2, past_key_values=cache, use_cache=True)
    return torch.cat([hidden, out2.last_hidden_state.reshape(-1, hidden.shape[-1])])
