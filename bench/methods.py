"""The implementations compared by bench/core.py, each as `setup(case) -> step`.

Every step is one forward + backward of the same per-sequence loss on the same inputs:
    seq_s = Σ_t log p(y_t | h_t)   over labelled tokens of sequence s
    loss  = −mean log σ(β·((seq_c − ref_c) − (seq_r − ref_r)))   (pairs: first half chosen)
            −mean log σ(β·(seq_s − ref_s))                       (an odd number of sequences)
Only the way the per-token log-probs are computed differs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import alignkit


@dataclass
class Case:
    name: str
    S: int
    T: int
    H: int
    V: int
    h: torch.Tensor       # [S, T, H] requires grad
    W: torch.Tensor       # [V, H] requires grad
    y: torch.Tensor       # [S, T], first 25% of each row = -100 (masked prompt)
    ref: torch.Tensor     # [S] reference sequence log-probs
    beta: float = 0.1

    @property
    def mask(self):
        return self.y != -100

    def reset(self):
        """Drops the gradients of the last run, outside any timed or profiled region (a free of
        a tensor allocated before profiling starts would be counted with an unknown size)."""
        self.h.grad = self.W.grad = None


def case_as(case: Case, dtype) -> Case:
    """The same inputs in another dtype (fresh leaves)."""
    return Case(case.name, case.S, case.T, case.H, case.V,
                case.h.detach().to(dtype).requires_grad_(),
                case.W.detach().to(dtype).requires_grad_(), case.y, case.ref, case.beta)


def make_case(name, S, T, H, V, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, T, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    y = torch.randint(0, V, (S, T), generator=g)
    y[:, : T // 4] = -100
    ref = torch.randn(S, generator=g) * 10 - T * 5
    return Case(name, S, T, H, V, h, W, y, ref)


def seq_loss(seq, case: Case):
    d = seq - case.ref
    if case.S % 2 == 0:
        B = case.S // 2
        d = d[:B] - d[B:]
    return -F.logsigmoid(case.beta * d).mean()


def _step(case: Case, token_lp_fn):
    def step():
        lp = token_lp_fn()
        seq_loss(lp.reshape(case.S, case.T).sum(-1), case).backward()
    return step


# ------------------------------------------------------------------------------------- methods
def floor(case: Case):
    """The three GEMMs no fused loss avoids, over the labelled tokens only: h·Wᵀ, G·W, Gᵀ·h."""
    hs = case.h.detach()[case.mask]
    W = case.W.detach()
    G = torch.randn(hs.shape[0], case.V, dtype=hs.dtype)   # the case's dtype: bf16 has its own

    def step():
        torch.mm(hs, W.t())
        torch.mm(G, W)
        torch.mm(G.t(), hs)
    return step


def one_gemm(case: Case):
    hs = case.h.detach()[case.mask]
    W = case.W.detach()
    return lambda: torch.mm(hs, W.t())


def naive(case: Case):
    def lp():
        logits = case.h @ case.W.t()
        logp = torch.log_softmax(logits.float(), -1)
        return logp.gather(-1, case.y.clamp(min=0)[..., None]).squeeze(-1) * case.mask
    return _step(case, lp)


def alignkit_op(backend):
    def setup(case: Case):
        return _step(case, lambda: alignkit.linear_token_logprobs(case.h, case.W, case.y,
                                                                  backend=backend))
    return setup


def alignkit_nograd(case: Case):
    h, W = case.h.detach(), case.W.detach()

    def step():
        with torch.no_grad():
            alignkit.linear_token_logprobs(h, W, case.y)
    return step


def trl_chunked(case: Case):
    """TRL 1.16's ChunkedLogProbFunction as TRL calls it off-Triton: every position scored."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as CHUNK

    def lp():
        out = ChunkedLogProbFunction.apply(case.h.reshape(-1, case.H), case.W, None,
                                           case.y.clamp(min=0).reshape(-1), 1.0, CHUNK, None,
                                           1.0, ())
        return out[0].view(case.S, case.T).masked_fill(~case.mask, 0)
    return _step(case, lp)


def torch_lce(case: Case):
    """torch 2.13's F.linear_cross_entropy with the chunked options, reduction='none'."""
    opts = torch.nn.LinearCrossEntropyOptions()

    def lp():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ce = F.linear_cross_entropy(case.h.reshape(-1, case.H), case.W, case.y.reshape(-1),
                                        reduction="none", ignore_index=-100, options=opts)
        return -ce
    return _step(case, lp)


def cce_compile(case: Case):
    """Apple's cut-cross-entropy, impl='torch_compile' (inductor-fused full-logits loss)."""
    from cut_cross_entropy import linear_cross_entropy

    def lp():
        return -linear_cross_entropy(case.h, case.W, case.y, reduction="none",
                                     impl="torch_compile")
    return _step(case, lp)


def liger_dpo(compiled: bool):
    """Liger's fused linear DPO loss (pairs only; no reference model, its own loss math)."""
    def setup(case: Case):
        if case.S % 2:
            return None
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        loss_fn = LigerFusedLinearDPOLoss(beta=case.beta, compiled=compiled, use_ref_model=False)

        def step():
            loss = loss_fn(case.W, case.h, case.y)[0]
            loss.backward()
        return step
    return setup


METHODS = {
    "naive full logits": naive,
    "alignkit (auto)": alignkit_op("auto"),
    "alignkit (torch backend)": alignkit_op("torch"),
    "TRL ChunkedLogProbFunction": trl_chunked,
    "torch F.linear_cross_entropy chunked": torch_lce,
    "Liger fused DPO (eager)": liger_dpo(False),
    "CCE torch_compile": cce_compile,
}
