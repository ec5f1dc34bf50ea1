"""Sampling from a policy and reading a rollout back through the fused head.

A ``Rollout`` holds B prompts, left-padded to one length P, and their sampled responses,
right-padded to T: [query | response] is one row of P + T ids whose attention mask is 1 on the
prompt's and the response's tokens. A response runs to its first EOS (kept) or to
max_new_tokens. Hidden state P − 1 + t predicts response token t, so the policy's per-token
log-probs, the reference's and the critic's values all read columns P − 1 .. P + T − 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from alignkit.api import linear_token_logprobs
from alignkit.losses.options import check_number
from alignkit.model.heads import head_of, match_head_dtypes
from alignkit.model.reward_model import SequenceScores, score_sequences

IGNORE = -100


def check_sampling(cfg, counts: Sequence[str]) -> None:
    """A sampling config's options (PPOConfig, SampleConfig): the named counts integers >= 1,
    temperature > 0, top_p in (0, 1], top_k an integer >= 0."""
    for k in counts:
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
    check_number("temperature", cfg.temperature, low=0, low_open=True)
    check_number("top_p", cfg.top_p, low=0, high=1, low_open=True)
    if isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {cfg.top_k!r}")


def encode_prompts(tokenizer, prompts: Sequence, max_prompt_length: int):
    """Prompts -> (token-id tuples, messages): a string or {role, content} messages is rendered
    as the trainer renders a prompt (its chat template, the generation prompt added) and keeps its
    last max_prompt_length tokens; a list of token ids is taken as is (messages: None). A bad
    prompt raises ValueError naming its index."""
    from alignkit.train import Tokenise, prompt_of
    tk = Tokenise(tokenizer, max_prompt_length + 1, max_prompt_length, False)
    ids, msgs = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, (list, tuple)) and p and all(isinstance(x, int) and
                                                      not isinstance(x, bool) for x in p):
            ids.append(tuple(p)[-max_prompt_length:])
            msgs.append(None)
            continue
        try:
            m = prompt_of({"prompt": p})
            ids.append(tk.prompt(m))
        except TypeError as e:
            raise ValueError(f"prompts[{i}]: {e}") from None
        msgs.append(m)
    return ids, msgs


@dataclass
class Rollout:
    query: Tensor              # [B, P] prompt ids, left-padded
    query_mask: Tensor         # [B, P] 1 on prompt tokens
    response: Tensor           # [B, T] sampled ids, padded after the first EOS
    response_mask: Tensor      # [B, T] bool: the response's tokens (its EOS included)

    @property
    def ids(self) -> Tensor:
        return torch.cat([self.query, self.response], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask.long(), self.response_mask.long()], 1)

    @property
    def position_ids(self) -> Tensor:
        return (self.attention_mask.cumsum(1) - 1).clamp(min=0)

    @property
    def labels(self) -> Tensor:
        """[B, T] the response ids, IGNORE past each response's end."""
        return torch.where(self.response_mask, self.response, IGNORE)

    def select(self, idx: Tensor) -> "Rollout":
        return Rollout(self.query[idx], self.query_mask[idx], self.response[idx],
                       self.response_mask[idx])


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, P - len(s):] = torch.tensor(list(s))
            mask[i, P - len(s):] = 1
    return ids, mask


@torch.no_grad()
def sample(policy, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
           pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           seed: Optional[int] = None) -> Rollout:
    """One sampled response per prompt (token ids) with HF ``generate``; seed makes it
    repeatable without touching the caller's RNG state."""
    device = next(policy.parameters()).device
    q, qm = left_pad(prompts, pad_id)
    q, qm = q.to(device), qm.to(device)
    was = policy.training
    policy.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        out = policy.generate(input_ids=q, attention_mask=qm, do_sample=True,
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k or None, top_p=top_p, eos_token_id=eos_id,
                              pad_token_id=pad_id, use_cache=True)
    policy.train(was)
    resp = out[:, q.shape[1]:]
    if resp.shape[1] == 0:
        raise RuntimeError("generate returned no new tokens")
    is_eos = resp == eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    resp = torch.where(mask, resp, pad_id)
    return Rollout(q, qm, resp, mask)


def response_hidden(body, r: Rollout) -> Tensor:
    """[B, T, H]: the body's hidden states that predict each response token."""
    P, T = r.query.shape[1], r.response.shape[1]
    out = body(input_ids=r.ids, attention_mask=r.attention_mask, position_ids=r.position_ids,
               use_cache=False)
    return out.last_hidden_state[:, P - 1:P + T - 1]


def policy_head(model, temperature: float = 1.0):
    """(body, head weight, bias, op options) of a CausalLM; the sampling temperature joins the
    config's own logit scaling, so log-probs are those of the distribution sampled from."""
    body, head, opts = head_of(model)
    opts = dict(opts)
    opts["temperature"] = opts.get("temperature", 1.0) * temperature
    return body, head, opts


def token_logprobs_of(model, r: Rollout, temperature: float = 1.0,
                      backend: str = "auto") -> Tensor:
    """[B, T] the model's log-probs of the sampled tokens through the fused head (0 past each
    response's end); no [tokens × vocab] logits."""
    body, head, opts = policy_head(model, temperature)
    h, w, b = match_head_dtypes(response_hidden(body, r), head.weight, head.bias)
    return linear_token_logprobs(h, w, r.labels, bias=b, backend=backend, **opts)


def values_of(value_model, r: Rollout) -> Tensor:
    """[B, T] a critic's value of the state before each response token."""
    P, T = r.query.shape[1], r.response.shape[1]
    v = SequenceScores(value_model)(r.ids, r.position_ids, r.attention_mask)
    return v[:, P - 1:P + T - 1].float()


def scores_of(reward_model, r: Rollout) -> Tensor:
    """[B] the reward model's score of each prompt + response, at the response's last token."""
    dev = next(reward_model.parameters()).device
    return score_sequences(reward_model, r.ids.to(dev), r.attention_mask.to(dev)).float()
