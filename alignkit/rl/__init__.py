"""RLHF on the fused head: PPO's advantage arithmetic, best-of-N sampling and a small PPO loop.

    kl_penalized_rewards, gae, value_loss     alignkit.rl.advantages (formulas there)
    best_of_n                                 alignkit.rl.sample (``alignkit sample``)
    PPOLoop, PPOConfig                        alignkit.rl.ppo
"""
from alignkit.rl.advantages import gae, kl_penalized_rewards, masked_whiten, value_loss


def __getattr__(name):
    # the loop and the sampler need transformers; the arithmetic does not
    if name in ("PPOLoop", "PPOConfig"):
        from alignkit.rl import ppo
        return getattr(ppo, name)
    if name in ("best_of_n", "SampleConfig"):
        from alignkit.rl import sample
        return getattr(sample, name)
    raise AttributeError(f"module 'alignkit.rl' has no attribute {name!r}")


__all__ = ["kl_penalized_rewards", "gae", "value_loss", "masked_whiten", "PPOLoop", "PPOConfig",
           "best_of_n", "SampleConfig"]
