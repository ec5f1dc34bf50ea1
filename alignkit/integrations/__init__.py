"""Drop-ins: alignkit's fused head inside trainers people already run.

- ``alignkit.integrations.trl.patch_trainer(trainer)``: TRL 1.16 DPO / KTO / CPO / ORPO trainers.
- ``alignkit.integrations.hf.fused_preference_loss(model, batch, ...)``: for
  ``Trainer.compute_loss`` overrides and plain loops.
- ``alignkit.patch_model(model)``: a CausalLM that returns per-token log-probs for given labels.
"""
from alignkit.integrations.head import FusedOutput, fused_forward, patch_model

__all__ = ["patch_model", "fused_forward", "FusedOutput"]
