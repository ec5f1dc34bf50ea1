"""alignkit: fused LM-head log-probs and preference losses, straight from hidden states."""
from alignkit.api import (
    LinearTokenLogprobs,
    linear_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from alignkit.integrations.head import patch_model
from alignkit.losses import policy_loss, preference_loss, sft_loss
from alignkit.losses.distill import distill_loss
from alignkit.ops.backends import cpp_available
from alignkit.ops.options import EngineOptions, TileOptions

__version__ = "0.1.0"


def __getattr__(name):
    # the trainer imports lazily: the kernels and losses need neither transformers nor yaml
    if name in ("PreferenceTrainer", "TrainConfig"):
        import alignkit.train as train
        return getattr(train, name)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


__all__ = [
    "linear_token_logprobs",
    "token_logprobs",
    "sequence_logprobs",
    "LinearTokenLogprobs",
    "preference_loss",
    "policy_loss",
    "sft_loss",
    "distill_loss",
    "cpp_available",
    "TileOptions",
    "EngineOptions",
    "patch_model",
    "PreferenceTrainer",
    "TrainConfig",
]
