"""InstructGPT's three stages on alignkit's demo task (sort the digits), offline, on CPU:

1. SFT: a brief ``loss: sft`` run on the demo pairs' chosen answers (a small random-init Llama);
2. a reward model: ``loss: reward`` on the pairs, its held-out accuracy reported. Half the
   rejected answers are sorted but have a digit changed, so the reward model has to check the
   digits against the prompt, not only their order: a reward model that knows only order is
   hacked by PPO at once (it learns to write any ascending digits);
3. PPO: ``alignkit.rl.PPOLoop`` from the SFT policy against that reward model, reporting the
   mean reward of fresh samples as it trains and, on held-out prompts before and after, the
   reward and the task's ground truth (the share of answers that are exactly the sorted digits).

    python examples/rlhf_demo.py [--out DIR] [--ppo-steps 50]
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit.rl import PPOConfig, PPOLoop
    from alignkit.rl.rollout import encode_prompts, scores_of
    from alignkit.train import PreferenceTrainer
    from alignkit.train.data import load_rows
    from alignkit.train.demo import demo_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="./alignkit-rlhf-demo")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--rm-steps", type=int, default=1000)
    p.add_argument("--ppo-steps", type=int, default=50)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=5e-5, help="the policy's PPO learning rate")
    args = p.parse_args(argv)
    t_all = time.time()
    # attn_implementation sdpa: the recorded run. PPO on this small task depends on the reward
    # model's exact function: trained under varlen attention (the same math, other round-off)
    # the reward model reached 0.985 held-out accuracy and 50 PPO steps did not raise its score
    # at any of five (lr, kl_coef, seed) settings tried; the 0.965 one below is exploited
    base = demo_config(args.out, wrong_digits=True, n_train=20000, progress=False,
                       tensorboard=False, eval_steps=0, save_steps=0, reference="none",
                       loss_options={}, warmup_steps=0, attn_implementation="sdpa")

    # 1. SFT on the chosen answers: brief, so that the policy writes answers of the right shape
    #    but sorts only some of them (room for PPO)
    t0 = time.time()
    sft = PreferenceTrainer(dict(base, output_dir=os.path.join(args.out, "sft"), loss="sft",
                                 max_steps=args.sft_steps, lr=2e-3))
    sft.train()
    print(f"[1/3] SFT: {args.sft_steps} steps, held-out NLL per token "
          f"{sft.last_eval['nll']:.3f} ({time.time() - t0:.0f} s)")

    # 2. the reward model: twice the policy's width and depth (checking the digits against the
    #    prompt is harder than writing them), measured at 0.985 held-out accuracy in ~70 s
    t0 = time.time()
    rm_model = dict(base["model_config"], hidden_size=128, intermediate_size=256,
                    num_hidden_layers=4)
    rm_run = PreferenceTrainer(dict(base, output_dir=os.path.join(args.out, "rm"), loss="reward",
                                    max_steps=args.rm_steps, lr=5e-4, batch_size=16,
                                    model_config=rm_model))
    rm_run.train()
    rm_acc = rm_run.last_eval["rewards/accuracies"]
    rm_seconds = time.time() - t0
    print(f"[2/3] reward model: held-out accuracy {rm_acc:.3f} on {len(rm_run.eval_ex)} pairs "
          f"({rm_seconds:.0f} s)")

    # 3. PPO from the SFT policy against the reward model
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(args.out, "sft", "final"))
    rm = AutoModelForSequenceClassification.from_pretrained(os.path.join(args.out, "rm", "final"))
    train_prompts = [r["prompt"] for r in load_rows(base["data"])]
    loop = PPOLoop(policy, rm, sft.tokenizer, train_prompts,
                   PPOConfig(batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=12,
                             kl_coef=args.kl_coef, lr=args.lr, value_lr=1e-3, seed=0))
    held = [r["prompt"] for r in load_rows(base["eval_data"])][:64]
    held_ids, _ = encode_prompts(sft.tokenizer, held, base["max_prompt_length"])

    def held_out():
        """(mean reward, share exactly sorted) of fresh samples on the held-out prompts."""
        r = loop.sample(held_ids, seed=1234)
        right = 0
        for x, resp, m in zip(held, r.response, r.response_mask):
            said = sft.tokenizer.decode(resp[m], skip_special_tokens=True).split()
            right += said == sorted(x[0]["content"].split()[1:])
        return scores_of(rm, r).mean().item(), right / len(held)

    t0 = time.time()
    before, sorted_before = held_out()

    def log(step, rec):
        if step % 10 == 0 or step == 1:
            print(f"  step {step:3d}  score {rec['score']:+.3f}  kl {rec['kl']:.3f}  "
                  f"len {rec['response_length']:.1f}  value loss {rec['value/loss']:.3f}")
    history = loop.train(args.ppo_steps, log)
    after, sorted_after = held_out()
    ppo_seconds = time.time() - t0
    k = max(1, min(10, len(history) // 5))
    first = sum(r["score"] for r in history[:k]) / k
    last = sum(r["score"] for r in history[-k:]) / k
    print(f"[3/3] PPO: {args.ppo_steps} steps ({ppo_seconds:.0f} s); mean score of fresh samples "
          f"{first:+.3f} over the first {k} steps -> {last:+.3f} over the last {k}; on "
          f"{len(held)} held-out prompts: score {before:+.3f} -> {after:+.3f}, exactly sorted "
          f"{sorted_before:.2f} -> {sorted_after:.2f}")
    summary = dict(rm_accuracy=rm_acc, rm_seconds=rm_seconds, score_first=first,
                   score_last=last, held_out_before=before, held_out_after=after,
                   sorted_before=sorted_before, sorted_after=sorted_after,
                   ppo_seconds=ppo_seconds, total_seconds=time.time() - t_all, history=history)
    with open(os.path.join(args.out, "rlhf_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'rlhf_summary.json')} "
          f"({summary['total_seconds']:.0f} s in all)")
    return summary


if __name__ == "__main__":
    main()
