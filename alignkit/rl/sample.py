"""Best-of-N (rejection) sampling: N completions per prompt from a policy, scored by a reward
model, written as training rows for ``alignkit train``: the best completion as an SFT row, or the
best and the worst as a DPO pair (InstructGPT / Llama 2's rejection sampling feeding SFT and
preference data).

Rows written (TRL's conversational formats, which alignkit's loader reads):
    sft  {"prompt": [msg], "completion": [assistant msg], "score": s}
    dpo  {"prompt": [msg], "chosen": [assistant msg], "rejected": [assistant msg],
          "score_chosen": s, "score_rejected": s}
A prompt whose best and worst completions are the same text gives no pair: it is skipped and
counted (``skipped`` in the summary), never written as a pair with no preference in it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from alignkit.model.reward_model import is_reward_model
from alignkit.rl.rollout import check_sampling, encode_prompts, sample, scores_of

FORMATS = ("sft", "dpo")


@dataclass(frozen=True)
class SampleConfig:
    n: int = 4                       # completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0                   # 0: off
    top_p: float = 1.0
    batch_size: int = 16             # prompts per generate call (× n sequences)
    max_prompt_length: int = 512
    seed: int = 0

    def __post_init__(self):
        check_sampling(self, ("n", "max_new_tokens", "batch_size", "max_prompt_length"))


def best_of_n(policy, reward_model, tokenizer, prompts: Sequence, config=None) -> list:
    """For each prompt (a string or [{role, content}] messages): its n completions, best first,
    as {"prompt": [msg], "completions": [text, ...], "scores": [float, ...]}. The policy and the
    reward model share the tokenizer; prompts are rendered with its chat template."""
    from alignkit.train import pad_id_of
    cfg = config if isinstance(config, SampleConfig) else SampleConfig(**(config or {}))
    if not is_reward_model(reward_model):
        raise ValueError("reward_model must be a reward model (num_labels=1); train one with "
                         "loss: reward")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id: completions could never end")
    ids, msgs = encode_prompts(tokenizer, prompts, cfg.max_prompt_length)
    if None in msgs:
        raise ValueError(f"prompts[{msgs.index(None)}]: token ids; best_of_n writes training "
                         "rows, so give prompts as strings or {role, content} messages")
    pad = pad_id_of(tokenizer)
    out = []
    for s in range(0, len(ids), cfg.batch_size):
        chunk = ids[s:s + cfg.batch_size]
        rep = [p for p in chunk for _ in range(cfg.n)]
        r = sample(policy, rep, max_new_tokens=cfg.max_new_tokens, eos_id=tokenizer.eos_token_id,
                   pad_id=pad, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   seed=cfg.seed * 1_000_003 + s)
        scores = scores_of(reward_model, r).cpu()
        texts = [tokenizer.decode(resp[m], skip_special_tokens=True).strip()
                 for resp, m in zip(r.response.cpu(), r.response_mask.cpu())]
        for j in range(len(chunk)):
            sc = scores[j * cfg.n:(j + 1) * cfg.n]
            order = torch.argsort(sc, descending=True, stable=True).tolist()
            out.append({"prompt": msgs[s + j],
                        "completions": [texts[j * cfg.n + k] for k in order],
                        "scores": [float(sc[k]) for k in order]})
    return out


def to_rows(ranked: list, fmt: str) -> tuple[list, int]:
    """best_of_n's output -> (rows in format fmt, prompts skipped)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows, skipped = [], 0
    for x in ranked:
        best = [{"role": "assistant", "content": x["completions"][0]}]
        if fmt == "sft":
            rows.append({"prompt": x["prompt"], "completion": best, "score": x["scores"][0]})
            continue
        if x["completions"][0] == x["completions"][-1]:
            skipped += 1
            continue
        rows.append({"prompt": x["prompt"], "chosen": best,
                     "rejected": [{"role": "assistant", "content": x["completions"][-1]}],
                     "score_chosen": x["scores"][0], "score_rejected": x["scores"][-1]})
    return rows, skipped


def write_jsonl(rows: list, path: str) -> None:
    """Written to a temporary file and renamed, so a killed run leaves no half file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def sample_to_file(policy_dir: str, reward_model_dir: str, prompts_path: str, out: str,
                   fmt: str = "dpo", tokenizer_dir: Optional[str] = None, config=None) -> dict:
    """``alignkit sample``: load the policy, the reward model and the prompts (rows with a
    "prompt", or plain strings, .json / .jsonl), sample, write out. Returns a summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.model.reward_model import load_reward_model
    from alignkit.train import DataError, load_rows
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for name, d in (("policy", policy_dir), ("reward_model", reward_model_dir),
                    ("tokenizer", tokenizer_dir)):
        if d is not None and not os.path.isdir(d):
            raise DataError(f"{name}: {d!r} is not a local directory")
    rows = load_rows(prompts_path)
    prompts, bad = [], []
    for i, r in enumerate(rows):
        p = r if isinstance(r, str) else (r.get("prompt") if isinstance(r, dict) else None)
        (prompts.append(p) if p is not None else bad.append(i))
    if bad:
        raise DataError(f"{prompts_path}: {len(bad)} row(s) have no 'prompt' (rows "
                        f"{bad[:10]}); give rows with a prompt, or strings")
    if not prompts:
        raise DataError(f"{prompts_path}: no prompts")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    rm = load_reward_model(reward_model_dir)
    ranked = best_of_n(policy, rm, tok, prompts, config)
    out_rows, skipped = to_rows(ranked, fmt)
    write_jsonl(out_rows, out)
    n = sum(len(x["scores"]) for x in ranked)
    return dict(prompts=len(prompts), completions=n, rows=len(out_rows), skipped=skipped,
                mean_score=sum(sum(x["scores"]) for x in ranked) / n,
                mean_best=sum(x["scores"][0] for x in ranked) / len(ranked), out=out)
