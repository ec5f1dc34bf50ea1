"""``alignkit train CONFIG.yaml [--key value ...] [--resume]``, ``alignkit demo``,
``alignkit plot OUTPUT_DIR``, ``alignkit sample --policy DIR --reward-model DIR --prompts FILE
--out FILE`` (best-of-N), ``alignkit bench --hidden H --vocab V --tokens N --loss dpo`` (alignkit
against the installed peers on your shape), ``alignkit convert-checkpoint DIR --trust`` (old
pickled checkpoints -> safetensors + JSON)."""
from __future__ import annotations

import argparse
import sys


def _train(argv):
    from alignkit.train.config import TrainConfig, parse_overrides
    from alignkit.train.trainer import PreferenceTrainer
    p = argparse.ArgumentParser(prog="alignkit train",
                                description="Preference training from a YAML config; any config "
                                            "key can be overridden as --key value.")
    p.add_argument("config", nargs="?", help="YAML file of TrainConfig keys (optional: the "
                   "config can be given as --key value pairs alone)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint under output_dir")
    if any(a in ("-h", "--help") for a in argv):
        p.parse_args(argv)                # prints the help and exits
    # The config path, if any, comes first: a positional picked out of the middle would take the
    # value of an override (`--max_steps 2` read 2 as the path).
    path = argv[0] if argv and not argv[0].startswith("-") else None
    rest = [a for a in argv[1 if path else 0:] if a != "--resume"]
    cfg = TrainConfig.from_yaml(path, parse_overrides(rest))
    PreferenceTrainer(cfg).train(resume="--resume" in argv)
    return 0


def _demo(argv):
    import os
    import time

    from alignkit.train.config import TrainConfig
    from alignkit.train.demo import demo_config
    from alignkit.train.metrics import plot
    from alignkit.train.trainer import PreferenceTrainer
    p = argparse.ArgumentParser(prog="alignkit demo",
                                description="DPO on a synthetic sorting-preference task with a "
                                            "small random-init Llama, offline, on CPU.")
    p.add_argument("--output-dir", default="./alignkit-demo")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--packing", default=None, choices=("padded", "padding_free",
                                                       "shared_prompt"))
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    over = {k: v for k, v in (("max_steps", args.max_steps), ("packing", args.packing))
            if v is not None}
    t0 = time.time()
    cfg = TrainConfig.from_dict(demo_config(args.output_dir, **over))
    trainer = PreferenceTrainer(cfg)
    trainer.train(resume=args.resume)
    after = trainer.last_eval
    png = plot(args.output_dir)
    print(f"\nheld-out reward accuracy after {cfg.max_steps} steps: "
          f"{after['rewards/accuracies']:.3f} on {len(trainer.eval_ex)} unseen pairs (chance: "
          f"0.5; the policy starts as the reference, where every reward is 0)")
    print(f"wrote {os.path.join(args.output_dir, 'metrics.jsonl')}, {png}, checkpoints under "
          f"{os.path.join(args.output_dir, 'checkpoints')} and the model in "
          f"{os.path.join(args.output_dir, 'final')} ({time.time() - t0:.0f} s)")
    return 0


def _plot(argv):
    from alignkit.train.metrics import plot
    p = argparse.ArgumentParser(prog="alignkit plot", description="Reward curves -> PNG")
    p.add_argument("output_dir")
    p.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/rewards.png)")
    args = p.parse_args(argv)
    print(plot(args.output_dir, args.out))
    return 0


def _sample(argv):
    from alignkit.rl.sample import FORMATS, SampleConfig, sample_to_file
    d = SampleConfig()
    p = argparse.ArgumentParser(prog="alignkit sample",
                                description="Best-of-N: N completions per prompt from a policy, "
                                            "scored by a reward model, written as JSONL rows "
                                            "that alignkit train reads (the best as SFT rows, or "
                                            "best/worst as DPO pairs).")
    p.add_argument("--policy", required=True, help="local CausalLM directory")
    p.add_argument("--reward-model", required=True, help="local reward-model directory "
                   "(alignkit train with loss: reward writes one to OUTPUT_DIR/final)")
    p.add_argument("--prompts", required=True, help=".json/.jsonl rows with a 'prompt' "
                   "(a string or messages), or strings")
    p.add_argument("--out", required=True, help="the .jsonl to write")
    p.add_argument("--format", default="dpo", choices=FORMATS)
    p.add_argument("--tokenizer", default=None, help="default: the policy's directory")
    for k in ("n", "max_new_tokens", "top_k", "batch_size", "max_prompt_length", "seed"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=getattr(d, k))
    for k in ("temperature", "top_p"):
        p.add_argument("--" + k.replace("_", "-"), type=float, default=getattr(d, k))
    a = p.parse_args(argv)
    try:
        cfg = SampleConfig(n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                           top_k=a.top_k, top_p=a.top_p, batch_size=a.batch_size,
                           max_prompt_length=a.max_prompt_length, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    s = sample_to_file(a.policy, a.reward_model, a.prompts, a.out, a.format, a.tokenizer, cfg)
    print(f"{s['prompts']} prompts x {a.n} completions: mean score {s['mean_score']:+.3f}, mean "
          f"best {s['mean_best']:+.3f}; wrote {s['rows']} {a.format} rows to {s['out']}"
          + (f" ({s['skipped']} prompts skipped: best and worst completions identical)"
             if s["skipped"] else ""))
    return 0


def _convert_checkpoint(argv):
    from alignkit.train.checkpoint_convert import convert
    p = argparse.ArgumentParser(prog="alignkit convert-checkpoint",
                                description="Convert checkpoints of the old pickled format "
                                            "(model.pt, optimizer.pt, ...) in place to the "
                                            "safetensors + JSON format that --resume reads.")
    p.add_argument("dir", help="a checkpoint directory (step-*), OUTPUT_DIR/checkpoints or "
                   "OUTPUT_DIR")
    p.add_argument("--trust", action="store_true",
                   help="required: you trust where these files came from (they are pickles)")
    a = p.parse_args(argv)
    convert(a.dir, a.trust)
    return 0


def _bench(argv):
    from alignkit.bench.cli import main
    return main(argv)


COMMANDS = {"train": _train, "demo": _demo, "plot": _plot, "sample": _sample, "bench": _bench,
            "convert-checkpoint": _convert_checkpoint}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands: " + ", ".join(COMMANDS), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from alignkit.model.body import BodyError
    from alignkit.model.reward_model import RewardModelError
    from alignkit.train.checkpoint import CheckpointError
    from alignkit.train.config import ConfigError
    from alignkit.train.data import DataError
    from alignkit.train.model import ModelError
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError, ModelError, CheckpointError, BodyError,
            RewardModelError) as e:
        print(f"alignkit {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
