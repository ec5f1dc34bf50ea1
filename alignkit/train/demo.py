"""``alignkit demo``: DPO on a synthetic, learnable preference task, offline, in about a minute.

The task: "sort 7 3 9 1" -> chosen "1 3 7 9" (sorted), rejected either a shuffle of the digits or
the sorted list with one adjacent pair swapped. Which answer is better is decided by a rule the
policy can learn from the pairs alone (each digit is >= the one before), so held-out reward
accuracy climbs well above chance; a random-init model starts at chance.

Embedded defaults: a 2-layer Llama-style model with random init (H=64); a word-level tokenizer
built from the task's vocabulary with a chat template (so the template path is exercised); the
data written to OUTPUT_DIR/data/*.jsonl and read back through the normal loader.
"""
from __future__ import annotations

import json
import os
import random

from alignkit.train.tokenizer import from_vocabulary

DIGITS = [str(d) for d in range(10)]
WORDS = ["sort", "user", "assistant", "system", ":"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}")


def build_tokenizer(out_dir: str):
    """A word-level tokenizer from the task's vocabulary, saved to out_dir."""
    return from_vocabulary(WORDS + DIGITS, CHAT_TEMPLATE, out_dir)


def make_rows(n: int, seed: int, wrong_digits: bool = False):
    """n pairs of the task. wrong_digits: half the rejected answers are sorted but have one digit
    changed, added or dropped (a reward model must then check the digits against the prompt,
    not only their order: the RLHF demo's, so that PPO cannot win with any ascending answer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(4, 8)
        xs = [rng.randrange(10) for _ in range(k)]
        while len(set(xs)) < 2:                 # all equal: no wrong order exists
            xs = [rng.randrange(10) for _ in range(k)]
        good = sorted(xs)
        bad = list(good)
        if wrong_digits and rng.random() < 0.5:      # sorted, but a digit changed, added or lost
            while sorted(bad) == good:
                kind, j = rng.randrange(3), rng.randrange(k)
                if kind == 0:
                    bad[j] = rng.randrange(10)
                elif kind == 1:
                    bad.insert(j, rng.randrange(10))
                elif len(bad) > 1:
                    del bad[j]
            bad.sort()
        while bad == good:
            if rng.random() < 0.5:
                rng.shuffle(bad)
            else:
                j = rng.randrange(k - 1)
                bad[j], bad[j + 1] = bad[j + 1], bad[j]
        rows.append({"prompt": [{"role": "user", "content": "sort " + " ".join(map(str, xs))}],
                     "chosen": [{"role": "assistant", "content": " ".join(map(str, good))}],
                     "rejected": [{"role": "assistant", "content": " ".join(map(str, bad))}]})
    return rows


def demo_config(output_dir: str, wrong_digits: bool = False, n_train: int = 2000,
                **overrides) -> dict:
    data_dir = os.path.join(output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("eval", 200, 2)):
        with open(os.path.join(data_dir, f"{name}.jsonl"), "w") as f:
            for r in make_rows(n, seed, wrong_digits):
                f.write(json.dumps(r) + "\n")
    tok_dir = os.path.join(output_dir, "tokenizer")
    tokenizer = build_tokenizer(tok_dir)
    cfg = dict(
        model_config=dict(model_type="llama", vocab_size=len(tokenizer),
                          hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=False),
        tokenizer=tok_dir, data=os.path.join(data_dir, "train.jsonl"),
        eval_data=os.path.join(data_dir, "eval.jsonl"), max_length=40, max_prompt_length=24,
        loss="dpo", loss_options=dict(beta=0.1), reference="precompute",
        reference_cache_dir=os.path.join(output_dir, "reference-cache"),
        packing="padding_free", output_dir=output_dir, batch_size=8, grad_accum=1,
        max_steps=150, lr=2e-3, warmup_steps=10, lr_scheduler="cosine", eval_steps=50,
        save_steps=50, precision="fp32", seed=0)
    cfg.update(overrides)
    return cfg
