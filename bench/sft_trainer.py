"""TRL 1.16's SFTTrainer with label smoothing, unpatched against alignkit's patch_trainer: one
training step's peak memory and time, fp32 on this CPU (issue #36).

    python -m bench.sft_trainer [--vocab 128256] [--length 512] [--batch 2] [--steps 4] [--write]

TRL runs its full-logits forward when label_smoothing_factor is set ("Label smoothing needs the
full logits"): [B, L, V] logits, their log-softmax and the smoothing sum. Patched, the body runs
once and alignkit.sft_loss scores the head a tile at a time. Model: Llama-style, H=256, 2 layers,
V=--vocab, random init; rows: prompt/completion pairs of exact lengths (one word one token).
Per run: the step's peak (the tensors resident at its start: parameters, gradients, optimizer
state; plus the exact peak allocated inside it, profiler events), that peak above the resident
tensors, and the median step time. Each run in this process, one after the other; the
profiler counts allocations, not the allocator's cache.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

from bench.trainer import StepClock, make_rows, make_tokenizer


def run_sft(V, L, batch, steps, patch, work, smoothing=0.1):
    import datasets
    import torch
    import transformers
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    tok_dir = os.path.join(work, "tok")
    if not os.path.isdir(tok_dir):
        make_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = None
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=L + 16,
        tie_word_embeddings=False))
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]}
            for r in make_rows(batch * (steps + 1), L)]
    clock = StepClock(2, steps)

    class CB(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.on_end(state.global_step, [trainer.model], trainer.optimizer)

    args = SFTConfig(output_dir=os.path.join(work, f"sft-{patch}"), per_device_train_batch_size=batch,
                     max_length=L + 8, max_steps=steps, logging_steps=1, report_to="none",
                     use_cpu=True, bf16=False, save_strategy="no", learning_rate=1e-5, seed=0,
                     disable_tqdm=True, dataloader_num_workers=0,
                     label_smoothing_factor=smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows), callbacks=[CB()])
        if patch:
            from alignkit.integrations.trl import patch_trainer
            patch_trainer(trainer)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(peak=clock.peak, resident=clock.resident, step_s=clock.step_seconds(),
                loss=losses[0] if losses else float("nan"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--write", action="store_true",
                   help="record the table as rows (bench/out/rows/<machine class>/sft_trainer.json)")
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="ak-sft-bench-")
    res = {name: run_sft(a.vocab, a.length, a.batch, a.steps, patch, work)
           for name, patch in (("TRL SFTTrainer, label_smoothing 0.1", False),
                                ("+ alignkit patch_trainer", True))}
    base = res["TRL SFTTrainer, label_smoothing 0.1"]
    lines = [f"SFTTrainer step, V={a.vocab}, L={a.length}, batch {a.batch}, H=256, 2 layers, fp32",
             "| run | step peak MiB | above resident MiB | step s | first loss |",
             "|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['peak'] / 2**20:.0f} ({base['peak'] / r['peak']:.2f}x "
                     f"below) | {(r['peak'] - r['resident']) / 2**20:.0f} "
                     f"({(base['peak'] - base['resident']) / (r['peak'] - r['resident']):.2f}x "
                     f"below) | {r['step_s']:.2f} | {r['loss']:.4f} |")
    text = "\n".join(lines)
    print(text)
    if a.write:
        import sys

        from alignkit.bench.harness import write_rows
        print("wrote", write_rows("sft_trainer", "python -m bench.sft_trainer " +
                                  " ".join(sys.argv[1:] if argv is None else argv), text))


if __name__ == "__main__":
    main()
