"""``PPOLoop``: InstructGPT's stage 3 (Ouyang et al. 2022, arXiv:2203.02155) around the fused
policy loss, small enough to read in one sitting.

One ``step()``:
1. **Rollout** (no grad): B prompts -> one sampled response each (HF ``generate``); the policy's
   and the frozen reference's log-probs of the sampled tokens through the fused head
   (``token_logprobs_of``), the critic's values, the reward model's scores.
2. **Rewards and advantages**: R_t = −β·KL_t plus the score on the last token
   (``kl_penalized_rewards``), then GAE (``gae``), advantages whitened.
3. **Update**, ``ppo_epochs`` passes over shuffled minibatches: the clipped policy loss
   ``alignkit.policy_loss(loss_type="ppo")`` on the policy's hidden states (the LM head never
   forms [tokens × vocab] logits in the update), the clipped value loss (``value_loss``) and, with
   ``ptx_coef`` > 0, PPO-ptx: ptx_coef × the NLL of pretraining rows through the fused op.

Memory in the update: the policy body's activations, grad_W + grad_h for the head (alignkit's
tiled op), and the critic; the vocabulary enters only through W and its gradient.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from alignkit.api import sequence_logprobs
from alignkit.losses import policy_loss
from alignkit.losses.options import check_number
from alignkit.losses.policy import KL_ESTIMATORS
from alignkit.model.heads import match_head_dtypes
from alignkit.model.reward_model import as_reward_model, is_reward_model
from alignkit.ops.options import TileOptions
from alignkit.rl.advantages import gae, kl_penalized_rewards, value_loss
from alignkit.rl.rollout import (
    Rollout,
    check_sampling,
    encode_prompts,
    policy_head,
    response_hidden,
    sample,
    scores_of,
    token_logprobs_of,
    values_of,
)


@dataclass(frozen=True)
class PPOConfig:
    """PPO's options (defaults: InstructGPT / TRL's PPOConfig where they have one)."""
    batch_size: int = 16            # prompts (= rollouts) per step
    mini_batch_size: int = 8        # rollouts per optimizer step in the update
    ppo_epochs: int = 2             # passes over the rollouts per step
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0                  # 0: off
    top_p: float = 1.0
    kl_coef: float = 0.05           # β of the per-token KL penalty
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    lr: float = 1e-5                # policy
    value_lr: Optional[float] = None  # critic (default: lr)
    max_grad_norm: Optional[float] = 1.0
    ptx_coef: float = 0.0           # PPO-ptx's γ; needs ptx_data
    ptx_batch_size: int = 8
    missing_eos_penalty: Optional[float] = None   # subtracted from the score of a response
    max_prompt_length: int = 512                  # that never reached EOS
    backend: str = "auto"
    engine: Optional[TileOptions] = None   # the fused head's options (memory, plan, autotune, ...)
    seed: int = 0

    def __post_init__(self):
        check_sampling(self, ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                              "ptx_batch_size", "max_prompt_length"))
        if isinstance(self.engine, dict):
            object.__setattr__(self, "engine", TileOptions(**self.engine))   # frozen
        if self.engine is not None and not isinstance(self.engine, TileOptions):
            raise TypeError(f"engine must be an alignkit.TileOptions (or a dict of its fields), "
                            f"got {self.engine!r}")
        if self.mini_batch_size > self.batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be <= batch_size "
                             f"({self.batch_size})")
        check_number("kl_coef", self.kl_coef, low=0)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got "
                             f"{self.kl_estimator!r}")
        check_number("gamma", self.gamma, low=0, high=1)
        check_number("lam", self.lam, low=0, high=1)
        check_number("cliprange", self.cliprange, low=0, low_open=True)
        check_number("cliprange_value", self.cliprange_value, low=0, low_open=True)
        check_number("vf_coef", self.vf_coef, low=0)
        check_number("lr", self.lr, low=0, low_open=True)
        if self.value_lr is not None:
            check_number("value_lr", self.value_lr, low=0, low_open=True)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        check_number("ptx_coef", self.ptx_coef, low=0)
        if self.missing_eos_penalty is not None:
            check_number("missing_eos_penalty", self.missing_eos_penalty, low=0)


class PPOLoop:
    """``PPOLoop(policy, reward_model, tokenizer, prompts, config=PPOConfig(), value_model=None,
    ref_policy=None, ptx_data=None)``.

    policy: a transformers CausalLM (trained in place). reward_model: a reward model
    (alignkit.model.reward_model; frozen). tokenizer: shared by the policy and the reward model.
    prompts: strings or lists of {role, content} messages, rendered with the tokenizer's chat
    template (as the trainer renders them), or lists of token ids. value_model: the critic, default a copy of the
    reward model (InstructGPT initialises the value function from the RM). ref_policy: the KL
    anchor, default a frozen copy of the policy as given (the SFT model). ptx_data: token-id
    sequences (or strings) of pretraining text for PPO-ptx.

    ``step()`` runs one rollout and update and returns its metrics; ``train(steps, callback)``
    runs several (callback(step, metrics) after each) and returns the list of metrics.
    """

    def __init__(self, policy, reward_model, tokenizer, prompts: Sequence, config=None,
                 value_model=None, ref_policy=None, ptx_data: Optional[Sequence] = None):
        from alignkit.train import pad_id_of
        self.cfg = cfg = config if isinstance(config, PPOConfig) else PPOConfig(**(config or {}))
        if not is_reward_model(reward_model):
            raise ValueError("reward_model must be a reward model (a sequence-classification "
                             "model with num_labels=1); train one with loss: reward")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token_id: responses could never end")
        n_vocab = len(tokenizer)
        for name, m in (("policy", policy), ("reward_model", reward_model)):
            rows = m.get_input_embeddings().num_embeddings
            if rows < n_vocab:
                raise ValueError(f"{name}'s embedding has {rows} rows but the tokenizer has "
                                 f"{n_vocab} tokens; the two must share the tokenizer")
        if not prompts:
            raise ValueError("prompts: empty")
        if cfg.ptx_coef > 0 and not ptx_data:
            raise ValueError("ptx_coef > 0 needs ptx_data (pretraining rows)")
        self.prompts, _ = encode_prompts(tokenizer, prompts, cfg.max_prompt_length)
        self.ptx = None
        if ptx_data:
            self.ptx = [list(tokenizer(x, add_special_tokens=True)["input_ids"])
                        if isinstance(x, str) else list(x) for x in ptx_data]
            if any(len(x) < 2 for x in self.ptx):
                raise ValueError("ptx_data: every row needs at least 2 tokens")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = pad_id_of(tokenizer)
        self.device = next(policy.parameters()).device
        self.policy = policy
        self.reward_model = reward_model.eval().requires_grad_(False)
        self.value_model = value_model if value_model is not None else \
            as_reward_model(copy.deepcopy(reward_model)).requires_grad_(True)
        self.value_model.train()
        self.ref_policy = (ref_policy if ref_policy is not None else
                           copy.deepcopy(policy)).eval().requires_grad_(False)
        # the fused AdamW kernel: no parameter-sized temporaries (foreach's would be V·H each for
        # the embedding and the head), and ~4x faster on CPU (alignkit.train.trainer)
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                     lr=cfg.lr, fused=True)
        self.value_opt = torch.optim.AdamW(self.value_model.parameters(),
                                           lr=cfg.value_lr or cfg.lr, fused=True)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0

    # ------------------------------------------------------------------ rollout
    def _next_prompts(self) -> list:
        idx = torch.randint(len(self.prompts), (self.cfg.batch_size,), generator=self.gen)
        return [self.prompts[i] for i in idx.tolist()]

    def sample(self, prompts: Optional[list] = None, seed: Optional[int] = None) -> Rollout:
        """Fresh samples of the current policy (prompts: token-id tuples; default B random
        training prompts)."""
        c = self.cfg
        return sample(self.policy, prompts or self._next_prompts(),
                      max_new_tokens=c.max_new_tokens, eos_id=self.eos_id, pad_id=self.pad_id,
                      temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                      seed=c.seed * 1_000_003 + self.step_count if seed is None else seed)

    @torch.no_grad()
    def score(self, r: Rollout) -> torch.Tensor:
        """[B] the reward model's scores, less missing_eos_penalty where no EOS was sampled."""
        s = scores_of(self.reward_model, r)
        if self.cfg.missing_eos_penalty is not None:
            ended = ((r.response == self.eos_id) & r.response_mask).any(1)
            s = s - self.cfg.missing_eos_penalty * (~ended).float()
        return s

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        r = self.sample()
        mask = r.response_mask
        with torch.no_grad():
            old_lp = token_logprobs_of(self.policy, r, c.temperature, c.backend)
            ref_lp = token_logprobs_of(self.ref_policy, r, c.temperature, c.backend)
            old_values = values_of(self.value_model, r)
            scores = self.score(r)
            rewards = kl_penalized_rewards(scores, old_lp, ref_lp, mask, c.kl_coef,
                                           c.kl_estimator)
            adv, returns = gae(rewards, old_values, mask, c.gamma, c.lam, whiten=True)
        stats = {"policy/loss": [], "value/loss": [], "policy/clipfrac": [], "ptx/nll": []}
        B = r.query.shape[0]
        for _ in range(c.ppo_epochs):
            order = torch.randperm(B, generator=self.gen)
            for s in range(0, B, c.mini_batch_size):
                idx = order[s:s + c.mini_batch_size].to(self.device)
                self._update(r.select(idx), old_lp[idx], adv[idx], old_values[idx],
                             returns[idx], stats)
        self.step_count += 1
        kl = (old_lp - ref_lp)[mask]
        n = mask.sum(1).float()
        out = {"step": self.step_count, "score": scores.mean().item(),
               "kl": (kl.sum() / B).item(),
               "non_score_reward": (rewards.sum() - scores.sum()).item() / B,
               "response_length": n.mean().item(),
               "eos_rate": ((r.response == self.eos_id) & mask).any(1).float().mean().item(),
               "step_seconds": time.perf_counter() - t0}
        out.update({k: sum(v) / len(v) for k, v in stats.items() if v})
        return out

    def policy_loss(self, r: Rollout, old_lp, adv):
        """PPO's clipped objective on the policy's hidden states, through the fused head:
        (loss, metrics) of alignkit.policy_loss(loss_type="ppo")."""
        c = self.cfg
        body, head, opts = policy_head(self.policy, c.temperature)
        h, w, b = match_head_dtypes(response_hidden(body, r), head.weight, head.bias)
        return policy_loss(h, w, r.labels, advantages=adv, old_logprobs=old_lp, bias=b,
                           loss_type="ppo", epsilon_low=c.cliprange, backend=c.backend,
                           tiles=c.engine, **opts)

    def _update(self, r: Rollout, old_lp, adv, old_values, returns, stats):
        c = self.cfg
        pg, m = self.policy_loss(r, old_lp, adv)
        vpred = values_of(self.value_model, r)
        vf = value_loss(vpred, old_values, returns, r.response_mask, c.cliprange_value)
        loss = pg + c.vf_coef * vf
        if c.ptx_coef > 0:
            nll = self._ptx_nll()
            loss = loss + c.ptx_coef * nll
            stats["ptx/nll"].append(nll.item())
        self.opt.zero_grad(set_to_none=True)
        self.value_opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), c.max_grad_norm)
        self.opt.step()
        self.value_opt.step()
        stats["policy/loss"].append(pg.item())
        stats["value/loss"].append(vf.item())
        stats["policy/clipfrac"].append(m["clip_ratio/region_mean"].item())

    def _ptx_nll(self):
        """InstructGPT's PPO-ptx term: the mean NLL per token of a batch of pretraining rows,
        through the fused op (labels: each row's next tokens)."""
        c = self.cfg
        idx = torch.randint(len(self.ptx), (c.ptx_batch_size,), generator=self.gen).tolist()
        rows = [self.ptx[i][:c.max_prompt_length + c.max_new_tokens] for i in idx]
        L = max(map(len, rows))
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        am = torch.zeros(len(rows), L, dtype=torch.long)
        for i, x in enumerate(rows):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(x) - 1] = torch.tensor(x[1:])
            am[i, :len(x)] = 1
        ids, labels, am = ids.to(self.device), labels.to(self.device), am.to(self.device)
        body, head, opts = policy_head(self.policy)
        hs = body(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
        h, w, b = match_head_dtypes(hs, head.weight, head.bias)
        sums, counts = sequence_logprobs(h, w, labels, bias=b, backend=c.backend, tiles=c.engine,
                                         **opts)
        return -sums.sum() / counts.sum().clamp(min=1)

    def train(self, steps: int, callback: Optional[Callable] = None) -> list:
        history = []
        for _ in range(steps):
            rec = self.step()
            history.append(rec)
            if callback is not None:
                callback(self.step_count, rec)
        return history

    def config_dict(self) -> dict:
        return asdict(self.cfg)
