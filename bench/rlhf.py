"""The RLHF pipeline (issue #19).

1. **PPO update memory against the vocabulary.** The peak of one ``PPOLoop._update`` (the
   clipped policy loss on the fused head, the value loss, backward) for one minibatch of a fixed
   synthetic rollout, at growing V, against the same update with the policy's log-probs taken
   from full logits (``dense``: the model's own logits path, what TRL's PPOTrainer does). The
   peaks are exact (alignkit.bench.profiling), with the gradients allocated inside the window. The
   parameter gradients (the policy's and the critic's, embeddings and head included: 3·V·H·4
   bytes of them grow with V) are written by any update; alignkit's peak is the larger of the
   backward's activations and those gradients, the dense update's adds the [B·T, V] logits and
   their softmax and gradient on top.
2. **A reward model on real preference data**, ``../shared/data/dpo_en_demo.json`` (300 pairs,
   a BPE tokenizer trained on them locally, 20% held out), trained with ``loss: reward``: its
   held-out accuracy and time.

    python -m bench.rlhf [--write]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignkit.bench import harness
from alignkit.bench.profiling import peak_memory_bytes

OUT = Path(__file__).parent
VOCABS = (8192, 32768, 131072)
B, P, T, H = 8, 64, 256, 256              # rollouts in the minibatch, prompt, response, width


def _models(V):
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.model.reward_model import as_reward_model
    conf = AutoConfig.for_model("llama", vocab_size=V, hidden_size=H, intermediate_size=2 * H,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=P + T,
                                tie_word_embeddings=False)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(conf)
    rm = as_reward_model(AutoModelForCausalLM.from_config(conf), pad_token_id=0)
    return policy, rm


class _Tok:
    """The two fields PPOLoop reads of a tokenizer when prompts are given as token ids."""
    eos_token_id, pad_token_id = 1, 0

    def __init__(self, V):
        self.V = V

    def __len__(self):
        return self.V


def ppo_memory(V, dense: bool):
    from alignkit.losses.policy import policy_loss_from_logprobs
    from alignkit.rl import PPOConfig, PPOLoop
    from alignkit.rl.rollout import Rollout, token_logprobs_of, values_of

    class Dense(PPOLoop):
        def policy_loss(self, r, old_lp, adv):
            logits = self.policy(input_ids=r.ids, attention_mask=r.attention_mask,
                                 position_ids=r.position_ids).logits[:, P - 1:P + T - 1]
            lp = torch.log_softmax(logits.float(), -1).gather(
                -1, r.labels.clamp(min=0)[..., None]).squeeze(-1) * r.response_mask
            return policy_loss_from_logprobs(lp, None, r.labels, advantages=adv,
                                             old_logprobs=old_lp, loss_type="ppo")

    policy, rm = _models(V)
    cfg = PPOConfig(batch_size=B, mini_batch_size=B, max_new_tokens=T, max_prompt_length=P)
    loop = (Dense if dense else PPOLoop)(policy, rm, _Tok(V), [[2] * P], cfg)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    r = Rollout(torch.randint(2, V, (B, P), generator=g), torch.ones(B, P, dtype=torch.long),
                torch.where(mask, torch.randint(2, V, (B, T), generator=g), 0), mask)
    with torch.no_grad():
        old = token_logprobs_of(policy, r)
        vals = values_of(loop.value_model, r)
    adv = torch.randn(B, T, generator=g) * mask
    stats = {k: [] for k in ("policy/loss", "value/loss", "policy/clipfrac", "ptx/nll")}
    loop._update(r, old, adv, vals, vals + adv, stats)          # warm: optimizer state exists
    loop.opt.zero_grad(set_to_none=True)       # gradients freed before the window, so that the
    loop.value_opt.zero_grad(set_to_none=True)  # peak counts their allocation inside it
    peak = peak_memory_bytes(lambda: loop._update(r, old, adv, vals, vals + adv, stats))
    grads = sum(p.numel() * p.element_size() for m in (policy, loop.value_model)
                for p in m.parameters() if p.requires_grad)
    return peak, grads, B * T * V * 4


def reward_on_real_data(data_dir, steps=60, log=print):
    from alignkit.train import PreferenceTrainer
    from alignkit.train.data import load_rows
    from alignkit.train.tokenizer import texts_of, train_bpe
    path = os.path.join(data_dir, "dpo_en_demo.json")
    tmp = tempfile.mkdtemp(prefix="alignkit-rm-")
    tok = train_bpe(texts_of(load_rows(path)), 8000, os.path.join(tmp, "tok"))
    cfg = dict(model_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=256,
                                 intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=1024, tie_word_embeddings=False),
               tokenizer=os.path.join(tmp, "tok"), data=path, eval_fraction=0.2,
               max_length=512, max_prompt_length=256, loss="reward", reference="none",
               output_dir=os.path.join(tmp, "out"), batch_size=8, max_steps=steps, lr=3e-4,
               warmup_steps=5, eval_steps=20, progress=False, tensorboard=False, seed=0)
    t0 = time.time()
    tr = PreferenceTrainer(cfg, log=lambda *a: None)
    tr.train()
    return dict(accuracy=tr.last_eval["rewards/accuracies"], loss=tr.last_eval["loss"],
                pairs=len(tr.train_ex), held_out=len(tr.eval_ex), steps=steps,
                seconds=time.time() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("ALIGNKIT_DATA_DIR", str(
        Path(__file__).resolve().parents[2] / "shared" / "data")))
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    t0 = time.time()
    lines = ["| V | parameter gradients | alignkit update peak | dense update peak | dense / "
             "alignkit | logits [B·T, V] fp32 |", "|---|---|---|---|---|---|"]
    for V in VOCABS:
        fused, gw, logits = ppo_memory(V, dense=False)
        dense, _, _ = ppo_memory(V, dense=True)
        mib = lambda x: f"{x / 2**20:.1f} MiB"  # noqa: E731
        lines.append(f"| {V} | {mib(gw)} | {mib(fused)} | {mib(dense)} | "
                     f"{dense / fused:.1f}x | {mib(logits)} |")
        print(lines[-1], flush=True)
    rm = reward_on_real_data(a.data_dir)
    rm_line = (f"Reward model on `dpo_en_demo.json`: {rm['pairs']} training pairs, "
               f"{rm['held_out']} held out, {rm['steps']} steps: held-out accuracy "
               f"{rm['accuracy']:.3f} (loss {rm['loss']:.3f}) in {rm['seconds']:.0f} s.")
    print(rm_line)
    text = (f"## RLHF pipeline: PPO update memory, reward model on real data\n\nMachine: "
            f"{harness.machine()}. Command: `python -m bench.rlhf "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}` ({time.time() - t0:.0f} s). "
            f"One PPO minibatch update, B={B} rollouts of up to T={T} response tokens after "
            f"P={P} prompt tokens, a 2-layer H={H} Llama policy and critic.\n\n"
            + "\n".join(lines) + f"\n\n{rm_line}\n")
    if a.write:
        out = OUT / "out"
        out.mkdir(exist_ok=True)
        (out / "rlhf.md").write_text(text)
        harness.write_rows("rlhf", "python -m bench.rlhf " +
                           " ".join(sys.argv[1:] if argv is None else argv), text)


if __name__ == "__main__":
    main()
