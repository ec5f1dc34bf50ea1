"""A transformers CausalLM as (body, LM head), and the module the trainer runs.

``SequenceLogprobs(model)`` runs the body (``model.get_decoder()``) only, gathers the response
positions of its hidden states and calls alignkit's fused ``sequence_logprobs`` with the LM head's
weight: the model's logits path is never called. Wrapping the whole model in one module is also
what DDP and FSDP2 need: the head weight is used inside this module's forward, so DDP syncs its
gradient and FSDP2 all-gathers it with the root's parameters (and reduce-scatters its gradient).

Head transforms read from the config (alignkit.model.heads.head_options):
``final_logit_softcapping`` (Gemma 2/3) -> softcap, ``logits_scaling`` (Granite, logits / s) and
``logit_scale`` (Cohere, logits · s) -> temperature. A config with another logit multiplier is
refused by ``head_of`` (alignkit.model.heads).
"""
from __future__ import annotations

from torch import nn

from alignkit.api import sequence_logprobs
from alignkit.losses import preference_loss, sft_loss
from alignkit.model.body import body_hidden
# head_of and ModelError live with the head adapter (alignkit.rl uses them too); re-exported here
from alignkit.model.heads import ModelError, head_of, match_head_dtypes  # noqa: F401
from alignkit.train.objective import SFT


class SequenceLogprobs(nn.Module):
    """forward(batch tensors) -> (sums [S], counts [S]) of the response tokens' log-probs; with
    ``objective`` (a paired loss: ``alignkit.train.objective.Paired``), the loss itself through
    ``alignkit.preference_loss`` on the response hidden states -> (loss, metrics), so that the
    fused engine (its single pass included) runs inside this module's call; ``SFT``, through
    ``alignkit.sft_loss``."""

    def __init__(self, model, backend: str = "auto", tiles=None):
        super().__init__()
        self.model = model
        _, _, self.head_opts = head_of(model)
        self.backend = backend
        self.tiles = tiles                       # alignkit.TileOptions (the engine: section)

    def forward(self, input_ids, position_ids, attention_mask, gather, labels, segment_ids,
                num_sequences: int, input_ids2=None, position_ids2=None, attention_mask2=None,
                prefix: int = 0, objective=None, ref_logprobs=None, layout=None):
        body, head, _ = head_of(self.model)
        hidden = body_hidden(body, input_ids, position_ids, attention_mask, input_ids2,
                             position_ids2, attention_mask2, prefix, layout)
        h = hidden.index_select(0, gather)
        h, w, b = match_head_dtypes(h, head.weight, head.bias)
        if isinstance(objective, SFT):
            loss, metrics = sft_loss(h, w, labels, bias=b, backend=self.backend,
                                     tiles=self.tiles, **self.head_opts, **objective.options)
            key = "sft" if objective.options else "nll"
            return loss, {key: loss.detach(), **metrics,
                          "tokens": (labels != -100).sum().detach().float()}
        if objective is not None:
            return preference_loss(h, w, labels, bias=b, segment_ids=segment_ids,
                                   num_segments=num_sequences, loss=objective.loss,
                                   ref_logprobs=ref_logprobs, backend=self.backend,
                                   tiles=self.tiles, **self.head_opts, **objective.options)
        return sequence_logprobs(h, w, labels, bias=b, segment_ids=segment_ids,
                                 num_segments=num_sequences, backend=self.backend,
                                 tiles=self.tiles, **self.head_opts)


def forward_batch(module, batch, objective=None, ref_logprobs=None):
    """Calls a SequenceLogprobs (or its DDP / FSDP wrapper) on a packing.Batch: (sums, counts),
    or (loss, metrics) with an objective."""
    return module(batch.input_ids, batch.position_ids, batch.attention_mask, batch.gather,
                  batch.labels, batch.segment_ids, batch.num_sequences, batch.input_ids2,
                  batch.position_ids2, batch.attention_mask2, batch.prefix, objective,
                  ref_logprobs, batch.layout)
