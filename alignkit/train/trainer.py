"""``PreferenceTrainer``: a thin loop around the fused preference losses.

One optimizer step consumes G = batch_size · grad_accum · world_size examples of a seeded stream
(the concatenation of per-epoch permutations, so nothing is dropped at an epoch's end): micro-batch
m of rank r takes examples [m·world + r]·batch_size onward. So a 2-rank run and a 1-rank run with
twice the accumulation see the same examples per step and, with the loss averaged the same way,
take the same step. The data position is the step count, saved in every checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from typing import Optional

import numpy as np
import torch

from alignkit.model.attention import uses_varlen
from alignkit.model.reward_model import SequenceScores, as_reward_model
from alignkit.model.tiled_mlp import tile_mlp
from alignkit.ops.backends import cpu_has_bf16
from alignkit.train import checkpoint as ckpt
from alignkit.train import distributed
from alignkit.train.config import ConfigError, TrainConfig
from alignkit.train.data import Tokenise, load_rows, tokenise_rows
from alignkit.train.loading import check_vocab, load_model, load_tokenizer, model_from_config
from alignkit.train.metrics import MetricsLog
from alignkit.train.model import SequenceLogprobs, forward_batch, head_of
from alignkit.train.objective import (
    compute_loss,
    kto_uses_kl,
    paired_objective,
    ref_logprobs_of,
    reward_objective,
)
from alignkit.train.packing import collate, pad_id_of
from alignkit.train.reference import LiveReference, precompute

# model_from_config: built here before it moved to loading.py; scripts import it from here
__all__ = ["PreferenceTrainer", "model_from_config"]


class PreferenceTrainer:
    """``PreferenceTrainer(config, model=None, tokenizer=None, train_data=None, eval_data=None)``.

    config: a ``TrainConfig`` (or a dict of its keys). model / tokenizer: a transformers CausalLM
    and tokenizer (default: loaded as the config says). train_data / eval_data: a path, a
    ``datasets.Dataset`` or a list of rows (default: config.data / config.eval_data).
    callbacks: callables ``cb(trainer, step, record)`` run after every optimizer step (record:
    the logged metrics of that step, or None). ``train(resume=False)`` runs the loop and returns
    the last logged metrics.
    """

    def __init__(self, config, model=None, tokenizer=None, train_data=None, eval_data=None,
                 log=None, callbacks=()):
        self.cfg = cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.ranks = distributed.join()
        self._log = log or (print if self.rank == 0 else (lambda *a, **k: None))
        self.callbacks = list(callbacks)
        cfg.check_paths(need_data=train_data is None, need_model=model is None,
                        need_tokenizer=tokenizer is None)
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg)
        if model is None:
            model = load_model(cfg, tokenizer)
        self.pad_id = pad_id_of(tokenizer)
        self.reward = cfg.loss == "reward"
        if self.reward:          # a CausalLM gets a linear score head in place of its LM head
            model = as_reward_model(model, cfg.seed, self.pad_id)
        check_vocab(model, tokenizer)
        if not self.reward:
            head_of(model)                              # fail early if the head is unreachable
        attn = cfg.attention()
        if getattr(model.config, "_attn_implementation", None) != attn:
            model.set_attn_implementation(attn)   # a model passed in runs the config's attention
        self.attention = "varlen" if uses_varlen(model) else "dense"
        self.model, self.tokenizer = model.to(self.device), tokenizer
        tk = Tokenise(tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.append_eos)
        self.tok_settings = tk.settings()
        rows = load_rows(train_data if train_data is not None else cfg.data)
        eval_rows = None
        if eval_data is not None or cfg.eval_data is not None:
            eval_rows = load_rows(eval_data if eval_data is not None else cfg.eval_data)
        elif cfg.eval_fraction > 0:
            n_eval = max(1, int(round(len(rows) * cfg.eval_fraction)))
            order = np.random.default_rng(cfg.seed).permutation(len(rows))
            eval_rows = [rows[i] for i in order[:n_eval]]
            rows = [rows[i] for i in sorted(order[n_eval:])]
        self.train_ex = tokenise_rows(rows, tk, cfg.data_format, cfg.loss, "data")
        self.eval_ex = (tokenise_rows(eval_rows, tk, cfg.data_format, cfg.loss, "eval_data")
                        if eval_rows else None)
        if cfg.packing == "shared_prompt":
            for where, exs in (("data", self.train_ex), ("eval_data", self.eval_ex or [])):
                bad = next((i for i, e in enumerate(exs) if len(e.responses) != 2), None)
                if bad is not None:
                    raise ConfigError(f"packing shared_prompt needs pairs; {where} row {bad} has "
                                      f"{len(exs[bad].responses)} responses (use padded or "
                                      "padding_free)")
        self.kl = kto_uses_kl(cfg.loss, cfg.loss_options)
        self.objective = paired_objective(cfg.loss, cfg.loss_options)   # None for KTO
        self.precision = cfg.precision if cfg.precision != "auto" else (
            "bf16" if (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
            or (self.device.type == "cpu" and cpu_has_bf16()) else "fp32")
        if cfg.gradient_checkpointing:
            kw = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):       # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        if cfg.tiled_mlp:
            tile_mlp(model)
        self.module = SequenceScores(model) if self.reward else \
            SequenceLogprobs(model, backend=cfg.backend, tiles=cfg.engine_options())
        self.ref_tables = {}
        self.live_ref = None
        self._ref_ready = False
        self._perms = {}
        self.last_eval = None

    # this process's place in the group (distributed.Ranks), under the trainer's old names
    distributed = property(lambda self: self.ranks.distributed)
    rank = property(lambda self: self.ranks.rank)
    world = property(lambda self: self.ranks.world)
    device = property(lambda self: self.ranks.device)

    # ---------------------------------------------------------------- data order
    def _kl_partner(self, examples):
        n = len(examples)
        return (lambda i: (i + 1) % n) if self.kl else None

    def step_indices(self, step: int):
        """Examples of optimizer step `step` for this rank: [[micro-batch indices] * grad_accum]."""
        cfg, n = self.cfg, len(self.train_ex)
        b, G = cfg.batch_size, cfg.batch_size * cfg.grad_accum * self.world
        out = []
        for m in range(cfg.grad_accum):
            start = step * G + (m * self.world + self.rank) * b
            out.append([self._stream(start + j, n) for j in range(b)])
        return out

    def _stream(self, pos, n):
        epoch, k = divmod(pos, n)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
            perm = self._perms[epoch] = torch.randperm(n, generator=g).tolist()
        return perm[k]

    # ---------------------------------------------------------------- reference
    def _prepare_reference(self):
        cfg = self.cfg
        if self._ref_ready:
            return
        self._ref_ready = True
        if cfg.reference == "none":
            return
        if cfg.reference == "live":
            self.live_ref = LiveReference(self.model, cfg.backend)
            return
        key_extra = dict(tok=self.tok_settings, head=self.module.head_opts, kl=self.kl,
                         precision=self.precision)
        for name, exs in (("train", self.train_ex), ("eval", self.eval_ex)):
            if exs:
                self.ref_tables[name] = precompute(
                    self.model, exs, packing=cfg.packing, pad_id=self.pad_id,
                    batch_size=cfg.batch_size, kl_partner=self._kl_partner(exs),
                    attention=self.attention,
                    head_backend=cfg.backend, cache_dir=cfg.reference_cache_dir,
                    key_extra=key_extra, device=self.device, log=self._log)

    def _reference(self, batch, split):
        if self.cfg.reference == "none":
            return None
        if self.live_ref is not None:
            return self.live_ref(batch)
        return self.ref_tables[split].lookup(batch, self.device)

    # ---------------------------------------------------------------- one micro-batch
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def micro_loss(self, module, examples, idx, split="train"):
        batch = collate(examples, idx, self.cfg.packing, self.pad_id,
                        kl_partner=self._kl_partner(examples),
                        attention=self.attention).to(self.device)
        with self._autocast():
            if self.reward:
                scores = module(batch.input_ids, batch.position_ids, batch.attention_mask,
                                batch.last, batch.input_ids2, batch.position_ids2,
                                batch.attention_mask2, batch.prefix, batch.layout)
                loss, metrics = reward_objective(scores.float(), examples, idx,
                                                 self.cfg.loss_options)
                return loss, metrics, batch.tokens
            ref = self._reference(batch, split)
            if self.objective is not None:  # the loss inside the module: the fused engine
                ref_lp = ref_logprobs_of(self.cfg.loss, self.cfg.loss_options, ref,
                                         batch.labels.new_zeros(batch.num_sequences))
                loss, metrics = forward_batch(module, batch, self.objective, ref_lp)
                return loss, metrics, batch.tokens
            sums, counts = forward_batch(module, batch)
        desirable = None
        if self.cfg.loss == "kto":
            desirable = torch.tensor([examples[i].desirable for i in idx], device=self.device)
        loss, metrics = compute_loss(self.cfg.loss, self.cfg.loss_options, sums.float(), counts,
                                     ref, desirable)
        return loss, metrics, batch.tokens

    # ---------------------------------------------------------------- loop
    def _schedule(self, optimizer):
        cfg = self.cfg

        def f(step):
            if step < cfg.warmup_steps:
                return (step + 1) / (cfg.warmup_steps + 1)
            if cfg.lr_scheduler == "constant":
                return 1.0
            frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            if cfg.lr_scheduler == "linear":
                return max(0.0, 1.0 - frac)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, f)

    def evaluate(self, module=None, step: int = 0) -> Optional[dict]:
        if not self.eval_ex:
            return None
        module = module or self.module
        self._prepare_reference()
        sums, n = {}, 0
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            shard = list(range(self.rank, len(self.eval_ex), self.world))
            for s in range(0, len(shard), self.cfg.batch_size):
                idx = shard[s:s + self.cfg.batch_size]
                loss, m, _ = self.micro_loss(module, self.eval_ex, idx, "eval")
                m = dict(m, loss=loss)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() * len(idx)
                n += len(idx)
        self.model.train(was)
        keys = sorted(sums)
        vals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(n), device=self.device)])
        distributed.sum_over_ranks(vals, self.ranks)
        rec = {k: (vals[i] / vals[-1].clamp(min=1)).item() for i, k in enumerate(keys)}
        return dict(step=step, split="eval", **rec)

    def train(self, resume: bool = False) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        self._prepare_reference()
        module = distributed.wrap(self.module, self.model, self.cfg.fsdp, self.ranks)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        # the fused AdamW kernel (CPU and CUDA) where parameters are plain tensors: on the bench's
        # 20M-parameter model it is ~4x faster than the per-tensor loop
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
            **({"foreach": False} if self.distributed and cfg.fsdp else {"fused": True}))
        self.optimizer = optimizer
        scheduler = self._schedule(optimizer)
        logger = MetricsLog(cfg.output_dir, cfg.tensorboard) if self.rank == 0 else None
        start = 0
        if resume:
            def warn(msg):
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                self._log(f"warning: {msg}")
            path, state = ckpt.load_newest(cfg.output_dir, module, optimizer, scheduler, warn)
            if path is not None:
                start = state["step"]
                if start > cfg.max_steps:
                    raise ConfigError(f"max_steps: {cfg.max_steps} is below the step of the "
                                      f"checkpoint to resume ({start}, "
                                      f"{os.path.join(path, 'state.json')}); raise max_steps to "
                                      "train on, or start a new output_dir")
                self._log(f"resumed from {path} (step {start})")
            else:
                self._log(f"--resume: no checkpoint under {cfg.output_dir}; starting at step 0")
            if logger is not None:
                logger.truncate_after(start)
        elif logger is not None and os.path.isfile(logger.path):
            os.remove(logger.path)
        self.model.train()
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True)
        last = {}
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            acc, tokens = {}, 0
            micro = self.step_indices(step)
            for m, idx in enumerate(micro):
                sync = m == len(micro) - 1
                ctx = module.no_sync() if (not sync and hasattr(module, "no_sync")) else \
                    contextlib.nullcontext()
                with ctx:
                    loss, metrics, ntok = self.micro_loss(module, self.train_ex, idx)
                    (loss / cfg.grad_accum).backward()
                tokens += ntok
                for k, v in dict(metrics, loss=loss).items():
                    acc[k] = acc.get(k, 0) + v.detach().float() / cfg.grad_accum
            if cfg.max_grad_norm is not None:
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                acc["grad_norm"] = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done, rec = step + 1, None
            if done % cfg.logging_steps == 0 or done == cfg.max_steps:
                rec = distributed.mean_metrics(acc, self.ranks)
                dt = time.perf_counter() - t0
                rec = dict(step=done, **rec, lr=scheduler.get_last_lr()[0],
                           tokens_per_second=tokens * self.world / dt, step_seconds=dt)
                last = rec
                if logger is not None:
                    logger.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}",
                                    acc=f"{rec.get('rewards/accuracies', float('nan')):.2f}")
            if bar is not None:
                bar.update(1)
            for cb in self.callbacks:                   # before this step's eval and checkpoint
                cb(self, done, rec)
            if cfg.eval_steps and done % cfg.eval_steps == 0 and done != cfg.max_steps:
                self._eval_log(module, done, logger)
            if (cfg.save_steps and done % cfg.save_steps == 0) or done == cfg.max_steps:
                ckpt.save(cfg.output_dir, done, dict(examples_seen=done * cfg.batch_size *
                                                     cfg.grad_accum * self.world),
                          module, optimizer, scheduler)
        if bar is not None:
            bar.close()
        self.last_eval = self._eval_log(module, cfg.max_steps, logger)
        self.save_final(module)
        return last

    def _eval_log(self, module, step, logger):
        rec = self.evaluate(module, step)
        if rec is not None and logger is not None:
            logger.write(rec)
            acc = rec.get("rewards/accuracies")
            what = "" if acc is None else (", accuracy" if self.reward else
                                           ", reward accuracy") + f" {acc:.3f}"
            self._log(f"eval @ step {step}: loss {rec['loss']:.4f}{what}")
        return rec

    def save_final(self, module):
        ckpt.save_final(self.cfg.output_dir, self.model, self.tokenizer, module)
