"""The trainer's model and tokenizer: built from a config (random init) or loaded from a local
directory, and checked against each other before any data is read."""
from __future__ import annotations

import torch

from alignkit.model.reward_model import load_reward_model, reward_model_from_config
from alignkit.train.config import ConfigError, TrainConfig


def model_from_config(model_config: dict, attn_implementation: str = "sdpa", seed: int = 0,
                      reward: bool = False):
    """A transformers CausalLM (reward: a reward model, num_labels=1) with random init from a
    config mapping with ``model_type``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    mc = dict(model_config)
    model_type = mc.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model_config needs model_type (e.g. llama, qwen2, gemma)")
    try:
        conf = AutoConfig.for_model(model_type, **mc)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model_config: {e}") from None
    if reward:
        return reward_model_from_config(conf, seed, attn_implementation)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(conf, attn_implementation=attn_implementation)


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)


def load_model(cfg: TrainConfig, tokenizer=None):
    """The config's model (paths already checked by ``cfg.check_paths``). With model_config and
    a tokenizer, a vocab_size below the tokenizer's is refused before the model is built."""
    from transformers import AutoModelForCausalLM
    if cfg.model is not None and cfg.loss == "reward":
        return load_reward_model(cfg.model, cfg.attention(), cfg.seed)
    if cfg.model is not None:
        return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32,
                                                    attn_implementation=cfg.attention())
    v = cfg.model_config.get("vocab_size")
    if tokenizer is not None and v is not None and not (isinstance(v, int) and v >= len(tokenizer)):
        raise ConfigError(f"model_config.vocab_size ({v!r}) must be an integer >= the tokenizer's "
                          f"{len(tokenizer)} tokens (len(tokenizer)), or every id past it has no "
                          "embedding")
    return model_from_config(cfg.model_config, cfg.attention(), cfg.seed,
                             reward=cfg.loss == "reward")


def check_vocab(model, tokenizer):
    """Every token id of the tokenizer has a row in the model's input embedding and LM head."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    if n is not None and n < len(tokenizer):
        raise ConfigError(f"the model's embedding has {n} rows (vocab_size) but the tokenizer has "
                          f"{len(tokenizer)} tokens: ids {n}..{len(tokenizer) - 1} would index "
                          "past it; give a model whose vocab_size is at least len(tokenizer)")
