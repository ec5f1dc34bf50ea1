"""Reward and value models: a transformers ``AutoModelForSequenceClassification`` with
``num_labels=1``, i.e. a decoder body and a linear ``score`` head [1, H].

A CausalLM becomes one with ``as_reward_model``: the same family's sequence-classification class,
the CausalLM's body weights, a fresh score head, and no LM head (TRL's RewardTrainer does the
same by loading a CausalLM checkpoint with ``AutoModelForSequenceClassification``). So a trained
reward model saves with ``save_pretrained`` and loads back with
``AutoModelForSequenceClassification.from_pretrained(path)``.

``SequenceScores`` runs the body only and applies the score head to the hidden state of each
sequence's last token (given as flat positions, so padded and packed layouts both work; the
model's own forward finds the last token from pad ids, which packing would break), or to every
position (per-token values for PPO's critic).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from alignkit.model.body import body_hidden


class RewardModelError(ValueError):
    """The model cannot serve as a reward or value model."""


def is_reward_model(model) -> bool:
    score = getattr(model, "score", None)
    return isinstance(score, nn.Linear) and score.out_features == 1 and \
        isinstance(getattr(model, getattr(model, "base_model_prefix", ""), None), nn.Module)


def reward_parts(model):
    """(body, score head) of a sequence-classification model with one label."""
    if not is_reward_model(model):
        raise RewardModelError(f"{type(model).__name__} is not a reward model: it needs a body "
                               "(model.<base_model_prefix>) and a linear score head with one "
                               "output (AutoModelForSequenceClassification, num_labels=1); "
                               "convert a CausalLM with alignkit.model.reward_model.as_reward_model")
    return getattr(model, model.base_model_prefix), model.score


def reward_model_from_config(config, seed: int = 0, attn_implementation: Optional[str] = None):
    """A random-init reward model (num_labels=1) of a transformers config's family."""
    from transformers import AutoModelForSequenceClassification
    config.num_labels = 1
    torch.manual_seed(seed)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        return AutoModelForSequenceClassification.from_config(config, **kw)
    except ValueError as e:
        raise RewardModelError(f"model_type {config.model_type!r} has no sequence-"
                               f"classification class in transformers ({e})") from None


def as_reward_model(model, seed: int = 0, pad_token_id: Optional[int] = None):
    """A reward model from a reward model (returned as is) or a CausalLM: the family's
    ``...ForSequenceClassification`` with num_labels=1, the CausalLM's body weights copied in and
    its score head initialised by transformers (seeded). The LM head is dropped. pad_token_id
    goes into the config, so that the saved model's own forward finds the last token."""
    if not is_reward_model(model):
        get_dec = getattr(model, "get_decoder", None)
        body = get_dec() if callable(get_dec) else None
        if body is None or body is model:
            raise RewardModelError(f"{type(model).__name__}: neither a reward model nor a "
                                   "CausalLM whose body get_decoder() returns")
        import copy
        rm = reward_model_from_config(copy.deepcopy(model.config), seed,
                                      getattr(model.config, "_attn_implementation", None))
        rm_body, _ = reward_parts(rm)
        missing, unexpected = rm_body.load_state_dict(body.state_dict(), strict=False)
        if missing or unexpected:
            raise RewardModelError(f"{type(model).__name__}: its body's weights do not fit "
                                   f"{type(rm).__name__} (missing {missing[:4]}, unexpected "
                                   f"{unexpected[:4]})")
        model = rm.to(next(model.parameters()).device)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def load_reward_model(path: str, attn_implementation: str = "sdpa", seed: int = 0):
    """A local directory holding a reward model, or a CausalLM to start one from."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    conf = AutoConfig.from_pretrained(path)
    conf.num_labels = 1
    torch.manual_seed(seed)          # a CausalLM checkpoint has no score head: it is initialised
    return AutoModelForSequenceClassification.from_pretrained(
        path, config=conf, dtype=torch.float32, attn_implementation=attn_implementation)


class SequenceScores(nn.Module):
    """forward(input_ids, position_ids, attention_mask, last [S], ...) -> scores [S]: the score
    head on the hidden state at flat position last[s] of the body's output [rows·L, H];
    ``last=None`` -> per-position scores [rows, L] (a critic's values). The optional second pass
    is packing shared_prompt's (alignkit.train.packing)."""

    def __init__(self, model):
        super().__init__()
        reward_parts(model)
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, last: Optional[Tensor] = None,
                input_ids2=None, position_ids2=None, attention_mask2=None, prefix: int = 0,
                layout=None):
        body, score = reward_parts(self.model)
        if last is None:
            out = body(input_ids=input_ids, position_ids=position_ids,
                       attention_mask=attention_mask, use_cache=False)
            return score(out.last_hidden_state).squeeze(-1)
        hidden = body_hidden(body, input_ids, position_ids, attention_mask, input_ids2,
                             position_ids2, attention_mask2, prefix, layout)
        h = hidden.index_select(0, last)
        return score(h.to(score.weight.dtype)).squeeze(-1).float()


@torch.no_grad()
def score_sequences(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scores [B] of sequences [B, L] whose attention_mask is 1 on their tokens (padding on
    either side): the reward model's score at each row's last token, in eval mode."""
    was = model.training
    model.eval()
    B, L = input_ids.shape
    am = attention_mask.long()
    last_col = L - 1 - am.flip(1).argmax(1)                 # the last 1 of each row
    last = last_col + torch.arange(B, device=input_ids.device) * L
    pos = (am.cumsum(1) - 1).clamp(min=0)
    out = SequenceScores(model)(input_ids, pos, am, last)
    model.train(was)
    return out
