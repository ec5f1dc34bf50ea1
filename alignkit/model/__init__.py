"""What alignkit does to a transformers model: long-sequence attention and MLP, the decoder body
over the trainer's layouts, the LM head as the ops see it, and reward / value models.

    attention          varlen attention for packed rows, registered with transformers
    prefix_attention   a response's queries over a shared prompt and its own keys (CPU)
    tiled_mlp          the MLP a chunk of tokens at a time (Snowflake's ALST TiledMLP)
    body               a decoder body run over one of the trainer's layouts
    heads              a model's LM head: its logit transforms and dtypes
    reward_model       reward and value models (a score head on a decoder body)

Used by the trainer, the drop-ins and ``alignkit.rl``; imports only ``alignkit.ops`` and torch
(transformers lazily).
"""
from alignkit.model.attention import FLASH_VARLEN, VARLEN, register
from alignkit.model.reward_model import as_reward_model, load_reward_model
from alignkit.model.tiled_mlp import tile_mlp, untile_mlp

__all__ = ["register", "VARLEN", "FLASH_VARLEN", "as_reward_model", "load_reward_model",
           "tile_mlp", "untile_mlp"]
