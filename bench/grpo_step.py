"""TRL 1.16's GRPOTrainer step, unpatched against ``alignkit.integrations.trl.patch_trainer``:
the step's exact peak and time at a long completion (issue #15: "its logits-path memory gone").

    python -m bench.grpo_step [--completion-length 1024] [--generations 4] [--loss dapo] [--write]

Model: bench.trainer's Llama (H=256, 4 layers, 4 heads), its vocabulary a local word-level
tokenizer of ~32000 words, random init, fp32 on CPU. One GRPO step: 4 completions of exactly
``--completion-length`` tokens (``min_new_tokens``; no vLLM) to one prompt of 16 words, a
reward written here, the loss forward and backward, the optimizer step. Unpatched, TRL scores the
completions through the model's logits, [generations, T, V] fp32 plus the log-softmax's; patched,
alignkit's op answers TRL's ``fused_lm_head`` call straight from the hidden states.

Peak: the tensors resident before the step (parameters; Adam's state is created inside the first
step and counted there) plus the exact peak the profiler sees allocated during ``train()`` of
one step (generation included). Both runs in one process, unpatched first.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import warnings

import torch

from alignkit.bench.harness import machine, write_out
from alignkit.bench.profiling import MemoryWindow, resident_bytes

H, LAYERS, WORDS = 256, 4, 31996            # + 4 specials: a 32000-token vocabulary


def _reward(completions, **kw):
    """Distinct words per completion: any reward will do; the step's memory is the point."""
    text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t.split())) / 100.0 for t in text]


def run(completion_length=1024, generations=4, loss_type="dapo", words=WORDS, work=None,
        log=print):
    """{"unpatched" | "patched": (peak bytes, seconds, loss, op calls)} of one GRPO step each."""
    import datasets
    import transformers
    import trl

    import alignkit.integrations.head as head
    import alignkit.integrations.trl as akt
    from alignkit.train.tokenizer import from_vocabulary
    work = work or tempfile.mkdtemp(prefix="ak-grpo-step-")
    vocab = [f"w{i}" for i in range(words)]
    tok = from_vocabulary(vocab, "{% for m in messages %}{{ m['content'] }} {% endfor %}",
                          os.path.join(work, "tok"))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=688,
                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=4, tie_word_embeddings=False,
                                   max_position_embeddings=completion_length + 64,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = os.path.join(work, "model")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(vocab) for _ in range(16))} for _ in range(4)]
    calls = []
    real = head.linear_logprobs_stats               # the drop-ins' per-token head op
    out = {}
    for name in ("unpatched", "patched"):
        args = trl.GRPOConfig(
            output_dir=os.path.join(work, name), per_device_train_batch_size=generations,
            num_generations=generations, generation_batch_size=generations,
            max_completion_length=completion_length, max_steps=1, logging_steps=1,
            loss_type=loss_type, report_to="none", use_cpu=True, bf16=False,
            save_strategy="no", learning_rate=1e-5, seed=0, disable_tqdm=True,
            dataloader_num_workers=0,
            generation_kwargs={"min_new_tokens": completion_length})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = trl.GRPOTrainer(model=path, args=args, processing_class=tok,
                                 reward_funcs=_reward,
                                 train_dataset=datasets.Dataset.from_list(rows))
            if name == "patched":
                akt.patch_trainer(tr)
                # count the op's calls (the step must have gone through it)
                head.linear_logprobs_stats = lambda *a, **k: calls.append(1) or real(*a, **k)
            resident = resident_bytes([tr.model])
            window = MemoryWindow()
            torch.manual_seed(0)
            t0 = time.perf_counter()
            window.start()
            try:
                tr.train()
            finally:
                peak = resident + window.stop()
                head.linear_logprobs_stats = real
        seconds = time.perf_counter() - t0
        loss = next(h["loss"] for h in tr.state.log_history if "loss" in h)
        out[name] = (peak, seconds, loss, len(calls))
        if (len(calls) > 0) != (name == "patched"):
            raise RuntimeError(f"{name}: alignkit's op ran {len(calls)} times")
        log(f"  {name}: peak {peak / 2**20:.0f} MiB, {seconds:.1f} s, loss {loss:.4g}")
    return out


def table(out, completion_length, generations, V):
    logits = generations * completion_length * V * 4 / 2**20
    lines = ["| run | step peak MiB | step s (generation included) | loss |", "|---|---|---|---|"]
    for name, (peak, sec, loss, _) in out.items():
        lines.append(f"| {name} | {peak / 2**20:.0f} | {sec:.1f} | {loss:.4g} |")
    gone = (out["unpatched"][0] - out["patched"][0]) / 2**20
    lines.append(f"\nPatched, the step's peak is {gone:.0f} MiB lower; one fp32 [{generations}, "
                 f"{completion_length}, {V}] logits tensor is {logits:.0f} MiB.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--completion-length", type=int, default=1024)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--loss", default="dapo")
    p.add_argument("--write", action="store_true", help="write bench/out/grpo_step.md")
    a = p.parse_args(argv)
    out = run(a.completion_length, a.generations, a.loss)
    text = (f"machine: {machine()}\n\nGRPOTrainer ({a.loss}), {a.generations} completions x "
            f"{a.completion_length} tokens, Llama H={H}, {LAYERS} layers, V={WORDS + 4}, fp32\n\n"
            + table(out, a.completion_length, a.generations, WORDS + 4))
    print(text)
    if a.write:
        print(write_out("grpo_step", "bench.grpo_step", text))


if __name__ == "__main__":
    main()
