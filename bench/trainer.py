"""Trainer-level bench: alignkit's PreferenceTrainer against TRL 1.16's DPOTrainer, same model,
same data, same batch, same sequence length, fp32 on this CPU.

    python -m bench.trainer [--lengths 512,1024] [--steps 5] [--cap-gib 2] [--write]

Model: Llama-style, H=256, 4 layers, 4 heads, V=32000, random init. Data: synthetic pairs of
exact lengths (prompt P = L/2 words, chosen and rejected L/2 words each, one word one token), so
every step of every trainer holds the same tokens. Per trainer and length:
- step time: median of the gaps between consecutive step ends (data, forward, backward,
  optimizer, logging: everything a user waits for), after one warm-up step;
- tokens/s: the step's sequence tokens (2 pairs x 2 sequences x L) over the step time;
- peak memory of one step: the tensors resident when it starts (parameters, gradients and
  optimizer state of the policy, and TRL's live reference model) plus the exact peak allocated
  during the step (profiler events);
- the longest L (one pair per step) whose step peak stays under --cap-gib, per packing mode.
TRL runs with its default live reference model and with ``precompute_ref_log_probs=True``;
alignkit precomputes its reference (cached), so its step holds no reference forward. The drop-in
rows run the same TRL trainers after ``alignkit.integrations.trl.patch_trainer`` (ratios in those
rows are against TRL live-ref DPO; compare ORPO rows with each other).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import warnings

import torch

from alignkit.bench.harness import emit, machine
from alignkit.bench.profiling import MemoryWindow, resident_bytes

H, LAYERS, V, WORDS = 256, 4, 32000, 8000
MODEL = dict(model_type="llama", vocab_size=V, hidden_size=H, intermediate_size=688,
             num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=65536, tie_word_embeddings=False)


def make_tokenizer(out_dir):
    from alignkit.train.tokenizer import from_vocabulary
    return from_vocabulary([f"w{i}" for i in range(WORDS)],
                           "{% for m in messages %}{{ m['content'] }} {% endfor %}", out_dir)


def make_rows(n, L, seed=0):
    rng = random.Random(seed)

    def words(k):
        return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(k))
    half = L // 2
    # responses get L/2 - 1 words: with EOS each sequence is exactly L tokens
    return [{"prompt": words(half), "chosen": " " + words(half - 1),
             "rejected": " " + words(half - 1)} for _ in range(n)]


class StepClock:
    """Step-end times, and the memory of step `profile_step`: the tensors resident when it starts
    (parameters, gradients, optimizer state of the policy and of a reference model) plus the peak
    the profiler sees allocated during the step."""

    def __init__(self, profile_step, steps):
        # a profile step past the run's last step measures nothing: its window would open after
        # the last step and never close, and a profiler session left open crashed the process at
        # exit (SIGSEGV in ~ProfilerStateBase, after `bench.long_sequences real` had written
        # its table)
        self.ends, self.window = [], MemoryWindow()
        self.profile_step = profile_step if profile_step <= steps else None
        self.peak = self.resident = None

    def on_end(self, step, modules=(), optimizer=None):
        self.ends.append(time.perf_counter())
        if self.profile_step is None:
            return
        if step == self.profile_step - 1:
            self.resident = resident_bytes(modules, optimizer)
            self.window.start()
        elif step == self.profile_step:
            self.peak = self.resident + self.window.stop()

    def step_seconds(self):
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        # the profiled step is slower: leave it out
        skip = self.profile_step - 2 if self.profile_step is not None else None
        gaps = [g for i, g in enumerate(gaps) if i != skip] or gaps
        return statistics.median(gaps)


def run_alignkit(rows, L, steps, packing, tok_dir, work, batch=2, profile_step=None,
                 precision="fp32", **overrides):
    """One alignkit trainer run -> its StepClock (``.records``: the logged metrics per step;
    ``.trainer``: the PreferenceTrainer). overrides: TrainConfig keys over the bench's (e.g.
    attn_implementation, gradient_checkpointing, tiled_mlp, loss with reference). profile_step
    (default min(3, steps); past ``steps``: none): the step whose peak is measured; 1 opens the
    window before the first step, so its gradients and optimizer state, allocated inside it,
    count."""
    from alignkit.train import PreferenceTrainer
    profile_step = profile_step or min(3, steps)
    cfg = dict(dict(model_config=MODEL, tokenizer=tok_dir, max_length=L + 8,
                    max_prompt_length=L // 2 + 4, loss="dpo", loss_options={"beta": 0.1},
                    reference="precompute", reference_cache_dir=os.path.join(work, "refcache"),
                    packing=packing, output_dir=os.path.join(work, f"ak-{packing}-{L}"),
                    batch_size=batch, max_steps=steps, lr=1e-5, precision=precision,
                    progress=False, tensorboard=False, seed=0, save_steps=10**6), **overrides)
    clock = StepClock(profile_step, steps)
    clock.records = []
    tr = PreferenceTrainer(cfg, train_data=rows, callbacks=[
        lambda t, s, r: (clock.on_end(s, [t.model], t.optimizer), clock.records.append(r))],
                           log=lambda *a: None)
    tr.save_final = lambda module: None               # not part of a step
    clock.trainer = tr
    torch.manual_seed(0)
    if profile_step == 1:
        clock.resident = resident_bytes([tr.model])
        clock.window.start()
    tr.train()
    return clock


def child(spec):
    """One alignkit trainer run in this process, for fresh_run (--head-ab, and
    bench.long_sequences synthetic): prints one JSON line."""
    import json
    L, precision, packing, steps, *attn = spec.split(",")
    L, steps = int(L), int(steps)
    work = tempfile.mkdtemp(prefix="ak-bench-child-")
    tok_dir = os.path.join(work, "tok")
    make_tokenizer(tok_dir)
    c = run_alignkit(make_rows(steps * 2 + 4, L), L, steps, packing, tok_dir, work,
                     precision=precision, **({"attn_implementation": attn[0]} if attn else {}))
    last = c.records[-1] or {}
    print("RESULT " + json.dumps(dict(step_s=c.step_seconds(), peak=c.peak, tokens=2 * 2 * L,
                                      metrics={k: v for k, v in last.items()
                                               if k.startswith("rewards/")})), flush=True)


def fresh_run(spec: str, pythonpath: str, cwd: str) -> dict:
    """One alignkit trainer run in a fresh process (``--child spec``, spec
    "L,precision,packing,steps[,attn_implementation]"): its RESULT dict (step_s, peak, tokens,
    metrics). A process per run leaves no allocator or thread state from the runs before it."""
    import json
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=pythonpath)
    p = subprocess.run([sys.executable, "-m", "bench.trainer", "--child", spec], cwd=cwd,
                       env=env, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"{spec} ({pythonpath}): {p.stderr[-2000:]}")
    return json.loads(line[0][7:])


def head_ab(old_src, lengths, steps, rounds, precisions, packings):
    """alignkit's trainer at this checkout against the same trainer from another source tree
    (e.g. a worktree of the commit before the fused engine), same model, data and settings, each
    run a fresh process, alternating old/new per round: (L, precision, packing) -> medians."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the bench package from this checkout, alignkit from each tree: a directory holding only a
    # link to bench/ goes first on the path, then the tree whose alignkit is measured
    shim = tempfile.mkdtemp(prefix="ak-bench-shim-")
    os.symlink(os.path.join(here, "bench"), os.path.join(shim, "bench"))
    out = {}
    for L in lengths:
        for prec in precisions:
            for packing in packings:
                runs = {"previous": [], "engine": []}
                for _ in range(rounds):
                    for name, src in (("previous", old_src), ("engine", here)):
                        runs[name].append(fresh_run(f"{L},{prec},{packing},{steps}",
                                                    f"{shim}:{src}", shim))
                out[(L, prec, packing)] = (runs, head_floor(L, prec))
                med = _medians(runs)
                print(f"  {L} {prec} {packing}: previous {med['previous']:.3f} s, engine "
                      f"{med['engine']:.3f} s ({med['previous'] / med['engine']:.2f}x)", flush=True)
    return out


def _medians(runs):
    """Median step seconds of the previous and the engine runs."""
    return {k: statistics.median(r["step_s"] for r in v) for k, v in runs.items()}


def head_floor(L, precision, reps=5):
    """Seconds of the head's three GEMMs in a step (the 2 pairs' 4 responses of L/2 tokens),
    in the step's GEMM dtype: the floor under the head's share of the step."""
    from alignkit.ops.backends import gemm_dtype
    dt = gemm_dtype(torch.bfloat16 if precision == "bf16" else torch.float32,
                    torch.device("cpu"))
    M = 2 * 2 * (L // 2)
    h, W, G = (torch.randn(*s).to(dt) for s in ((M, H), (V, H), (M, V)))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(h, W.t()), torch.mm(G, W), torch.mm(G.t(), h)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def head_ab_table(out):
    lines = ["| L | precision | packing | previous step s | engine step s | engine tokens/s | "
             "engine vs previous | head 3-GEMM floor s (share of engine step) | engine peak MiB "
             "| previous peak MiB | rewards/margins | rewards/accuracies |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (L, prec, packing), (runs, fl) in out.items():
        med = _medians(runs)
        e = runs["engine"][-1]
        lines.append(f"| {L} | {prec} | {packing} | {med['previous']:.3f} | {med['engine']:.3f} | "
                     f"{e['tokens'] / med['engine']:.0f} | "
                     f"{med['previous'] / med['engine']:.2f}x | {fl:.3f} "
                     f"({fl / med['engine']:.0%}) | {e['peak'] / 2**20:.0f} | "
                     f"{runs['previous'][-1]['peak'] / 2**20:.0f} | "
                     f"{e['metrics'].get('rewards/margins', float('nan')):.4g} | "
                     f"{e['metrics'].get('rewards/accuracies', float('nan')):.2f} |")
    return lines


def run_trl(rows, L, steps, tok_dir, work, precompute, batch=2, profile_step=None, patch=False,
            kind="dpo", bf16=False):
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    profile_step = profile_step or min(3, steps)
    from alignkit.train.loading import model_from_config
    model = model_from_config(MODEL, "sdpa", seed=0)     # alignkit's own init, same seed
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = None
    clock = StepClock(profile_step, steps)

    class CB(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.on_end(state.global_step, [trainer.model, getattr(trainer, "ref_model", None)],
                         trainer.optimizer)

    common = dict(output_dir=os.path.join(work, f"trl-{kind}-{L}-{precompute}-{patch}"),
                  per_device_train_batch_size=batch, max_length=L + 8, max_steps=steps,
                  logging_steps=1, report_to="none", use_cpu=True, bf16=bf16,
                  save_strategy="no", beta=0.1, learning_rate=1e-5, dataloader_num_workers=0,
                  disable_tqdm=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import copy
        if kind == "dpo":
            args = DPOConfig(**common, precompute_ref_log_probs=precompute)
            ref = None if precompute else copy.deepcopy(model)
            trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                                 train_dataset=datasets.Dataset.from_list(rows), callbacks=[CB()])
        else:
            trainer = ORPOTrainer(model=model, args=ORPOConfig(**common), processing_class=tok,
                                  train_dataset=datasets.Dataset.from_list(rows), callbacks=[CB()])
        if patch:
            from alignkit.integrations.trl import patch_trainer
            patch_trainer(trainer)
        trainer.train()
    return clock


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,1024")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cap-gib", type=float, default=2.0)
    ap.add_argument("--cap-lengths", default="256,512,1024,2048,4096,8192,16384")
    ap.add_argument("--skip-cap", action="store_true")
    ap.add_argument("--write", action="store_true", help="write bench/out/trainer.md")
    ap.add_argument("--head-ab", metavar="OLD_SRC",
                    help="alignkit's trainer here against the one in OLD_SRC (a source tree, e.g. "
                         "a git worktree of an earlier commit), alternating fresh processes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--packings", default="padded")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    if a.child:
        return child(a.child)
    if a.head_ab:
        out = head_ab(os.path.abspath(a.head_ab), [int(x) for x in a.lengths.split(",")],
                      a.steps, a.rounds, a.precisions.split(","), a.packings.split(","))
        emit([f"machine: {machine()}", "", f"Llama H={H}, {LAYERS} layers, V={V}; 2 pairs per "
              f"step; step time: median over {a.rounds} fresh processes each (median of "
              f"{a.steps - 2} steps), previous and engine alternating", ""] + head_ab_table(out),
             a.write, "trainer_engine", "bench.trainer")
        return
    work = tempfile.mkdtemp(prefix="ak-bench-trainer-")
    tok_dir = os.path.join(work, "tok")
    make_tokenizer(tok_dir)
    lines = [f"machine: {machine()}", "",
             f"Llama H={H}, {LAYERS} layers, V={V}, fp32; 2 pairs per step; "
             f"median of {a.steps - 2} step times (step 1 warm-up, step 3 profiled)", "",
             "| L | trainer | step s | tokens/s | vs TRL (live ref) | peak MiB | vs TRL |",
             "|---|---|---|---|---|---|---|"]
    for L in [int(x) for x in a.lengths.split(",")]:
        rows = make_rows(a.steps * 2 + 4, L)
        tokens = 2 * 2 * L
        res = {}
        res["TRL DPOTrainer (live ref)"] = run_trl(rows, L, a.steps, tok_dir, work, False)
        res["TRL DPOTrainer (precomputed ref)"] = run_trl(rows, L, a.steps, tok_dir, work, True)
        res["TRL DPOTrainer (live ref) + alignkit patch_trainer"] = run_trl(
            rows, L, a.steps, tok_dir, work, False, patch=True)
        res["TRL ORPOTrainer"] = run_trl(rows, L, a.steps, tok_dir, work, False, kind="orpo")
        res["TRL ORPOTrainer + alignkit patch_trainer"] = run_trl(
            rows, L, a.steps, tok_dir, work, False, patch=True, kind="orpo")
        for packing in ("padded", "padding_free", "shared_prompt"):
            res[f"alignkit {packing}"] = run_alignkit(rows, L, a.steps, packing, tok_dir, work)
        base = res["TRL DPOTrainer (live ref)"]
        bt, bm = base.step_seconds(), base.peak
        for name, c in res.items():
            t = c.step_seconds()
            lines.append(f"| {L} | {name} | {t:.2f} | {tokens / t:.0f} | {bt / t:.2f}x | "
                         f"{c.peak / 2**20:.0f} | {c.peak / bm:.2f}x |")
            print(lines[-1], flush=True)
    if not a.skip_cap:
        cap = a.cap_gib * 2**30
        lines += ["", f"Longest L (one pair per step) whose step peak is under {a.cap_gib:g} GiB:",
                  "", "| trainer | longest L | peak at that L, MiB |", "|---|---|---|"]
        runners = {"TRL DPOTrainer (precomputed ref)":
                   lambda rows, L: run_trl(rows, L, 2, tok_dir, work, True, 1, 2)}
        for packing in ("padded", "padding_free", "shared_prompt"):
            runners[f"alignkit {packing}"] = (
                lambda rows, L, p=packing: run_alignkit(rows, L, 2, p, tok_dir, work, 1, 2))
        for name, run in runners.items():
            best = (0, 0)
            for L in [int(x) for x in a.cap_lengths.split(",")]:
                peak = run(make_rows(4, L, seed=L), L).peak
                print(f"  cap search {name} L={L}: {peak / 2**20:.0f} MiB", flush=True)
                if peak > cap:
                    break
                best = (L, peak)
            lines.append(f"| {name} | {best[0]} | {best[1] / 2**20:.0f} |")
            print(lines[-1], flush=True)
    emit(lines, a.write, "trainer", "bench.trainer")


if __name__ == "__main__":
    main()
