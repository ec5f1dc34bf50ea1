"""Preference losses: functional forms on sequence log-probs, and the fused entry point."""
from alignkit.losses.fused import LOSSES, logprob_loss, preference_loss
from alignkit.losses.modules import CPOLoss, DPOLoss, ORPOLoss, PreferenceLoss, SimPOLoss
from alignkit.losses.pairwise import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    orpo_loss,
    simpo_loss,
)
from alignkit.losses.policy import (
    KL_ESTIMATORS,
    POLICY_LOSS_TYPES,
    policy_loss,
    policy_loss_from_logprobs,
)
from alignkit.losses.sft import SFT_LOSS_TYPES, sft_loss
from alignkit.losses.reward import reward_pairwise_loss, reward_ranking_loss
from alignkit.losses.unpaired import kto_loss

__all__ = [
    "preference_loss", "logprob_loss", "LOSSES", "PreferenceLoss", "DPOLoss", "SimPOLoss", "CPOLoss", "ORPOLoss",
    "dpo_loss", "simpo_loss", "cpo_loss", "orpo_loss", "kto_loss", "reward_pairwise_loss",
    "reward_ranking_loss", "DPO_LOSS_TYPES", "CPO_LOSS_TYPES", "policy_loss", "POLICY_LOSS_TYPES",
    "policy_loss_from_logprobs", "sft_loss", "SFT_LOSS_TYPES",
    "KL_ESTIMATORS",
]
