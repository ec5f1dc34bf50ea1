"""Launchers (input validation + backend dispatch) and the autograd of each op."""
from alignkit.ops.linear_logprobs import linear_logprobs
from alignkit.ops.logits_logprobs import logits_logprobs
from alignkit.ops.options import BACKENDS, LogprobOptions

__all__ = ["linear_logprobs", "logits_logprobs", "LogprobOptions", "BACKENDS"]
