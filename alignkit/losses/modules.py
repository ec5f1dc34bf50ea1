"""Thin nn.Modules over preference_loss: options in the constructor, tensors in forward."""
from __future__ import annotations

from torch import nn

from alignkit.losses.fused import preference_loss, split_options


class PreferenceLoss(nn.Module):
    """``PreferenceLoss("dpo", beta=0.1)(hidden, weight, labels, ref_logprobs=...)``."""

    def __init__(self, loss: str = "dpo", **loss_options):
        super().__init__()
        split_options(loss, loss_options)  # unknown or misplaced options fail here, not later
        self.loss = loss
        self.options = dict(loss_options)

    def forward(self, hidden, weight, labels, *, ref_logprobs=None, ref_hidden=None,
                ref_weight=None, bias=None, segment_ids=None):
        return preference_loss(hidden, weight, labels, loss=self.loss, ref_logprobs=ref_logprobs,
                               ref_hidden=ref_hidden, ref_weight=ref_weight, bias=bias,
                               segment_ids=segment_ids, **self.options)

    def extra_repr(self):
        return f"loss={self.loss!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DPOLoss(PreferenceLoss):
    def __init__(self, **loss_options):
        super().__init__("dpo", **loss_options)


class SimPOLoss(PreferenceLoss):
    def __init__(self, **loss_options):
        super().__init__("simpo", **loss_options)


class CPOLoss(PreferenceLoss):
    def __init__(self, **loss_options):
        super().__init__("cpo", **loss_options)


class ORPOLoss(PreferenceLoss):
    def __init__(self, **loss_options):
        super().__init__("orpo", **loss_options)
