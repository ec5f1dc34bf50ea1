"""Long sequences on limited memory (issue #16): the packings on real mixed-length rows, the
longest sequence under a memory cap, and what attention and the MLP take of a step.

    python -m bench.long_sequences [real] [synthetic] [direct] [cap] [shares] [--write]

Model: bench.trainer's (Llama-style, H=256, 4 layers, 4 heads, I=688, V=32000, random init), fp32.

- ``real``: ``../shared/data/dpo_en_demo.json`` and ``dpo_zh_demo.json``, tokenised by a byte-level
  BPE trained here on both files (8000 tokens), max_length 1024 and 2048 (max_prompt_length half),
  2 pairs per micro-batch. Every trainer runs the same ``--rows`` rows (one epoch); the alignkit
  runs see the same batches in the same order (the order depends on the seed alone). tokens/s =
  the epoch's sequence tokens (prompt + response per sequence, alignkit's tokenisation) per step,
  over the mean gap between step ends after the first step. TRL DPOTrainer runs at its defaults
  (live reference model), the same model init and rows.
  ``--bf16`` adds alignkit padding_free in bf16 (``precision: auto`` on a CPU with bf16 units)
  and TRL in bf16 (``bf16=True``), and leaves out the sdpa rows.
- ``synthetic``: bench.trainer's synthetic rows at L=512 and 1024: each packing under today's
  sdpa and under varlen (auto), each run a fresh process, alternating (``--rounds``): the
  median step of each run, and the median of the rounds' paired speed-ups.
- ``direct``: the model module's forward + backward alone on one synthetic micro-batch, each
  packing under sdpa and under varlen, interleaved in one process (``--direct-rounds``).
- ``cap``: one synthetic pair per step (prompt L/2, chosen and rejected L/2 each, SimPO: no
  reference), the exact peak of the first optimizer step: the parameters plus the profiler's
  peak from before the step to its end (so gradients and Adam's state, allocated inside it,
  count). Per packing: without checkpointing, with it, and with it and the tiled MLP; each
  setting climbs the lengths until its peak passes the cap (``--cap-lengths``; the 32768-token
  runs take ~4 minutes each here).
- ``shares``: forward+backward of the model module on one padding_free micro-batch, whole and
  with the attention (or the MLP) replaced by a pass-through, interleaved: the difference is what
  that part takes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignkit.bench.harness import emit, machine
from bench.trainer import MODEL, make_rows, make_tokenizer, run_alignkit, run_trl

DATA = os.environ.get("ALIGNKIT_DATA_DIR",
                      str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def mean_gap(clock):
    gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    return sum(gaps) / len(gaps)


def plain(row):
    """A ShareGPT pair as plain strings {prompt, chosen, rejected} (the same text for TRL)."""
    return dict(prompt="\n".join(t["value"] for t in row["conversations"]),
                chosen=row["chosen"]["value"], rejected=row["rejected"]["value"])


def real(a, work, out):
    from alignkit.train.data import load_rows
    from alignkit.train.tokenizer import texts_of, train_bpe
    files = ("dpo_en_demo.json", "dpo_zh_demo.json")
    data = {f: [plain(r) for r in load_rows(os.path.join(DATA, f))[:a.rows]] for f in files}
    tok_dir = os.path.join(work, "bpe")
    tok = train_bpe(texts_of(list(data.values())), 8000)
    tok.chat_template = None               # plain text for both trainers
    tok.save_pretrained(tok_dir)
    out += ["", f"### Real rows: tokens/s per packing ({a.rows} rows per file, one epoch, "
            "2 pairs per micro-batch, fp32)", "",
            "| data | max_length | trainer | step s | tokens/s | vs padded | vs today's padded "
            "(sdpa) | vs TRL | padded rows / real tokens |", "|---|---|---|---|---|---|---|---|---|"]
    runs = [("padded", "auto", "fp32"), ("padding_free", "auto", "fp32"),
            ("shared_prompt", "auto", "fp32"), ("padded", "sdpa", "fp32"),
            ("padding_free", "sdpa", "fp32"), ("shared_prompt", "sdpa", "fp32")]
    if a.bf16:                              # the trainer's default precision on bf16 CPUs
        runs = [r for r in runs if r[1] == "auto"] + [("padding_free", "auto", "bf16")]
    for f, rows in data.items():
        for L in a.lengths:
            steps = len(rows) // 2
            res, tokens, padfrac = {}, None, None
            for packing, attn, prec in runs:
                clock = run_alignkit(rows, L - 8, steps, packing, tok_dir, work,
                                     profile_step=steps + 1, precision=prec,
                                     attn_implementation=attn, max_prompt_length=L // 2)
                tr = clock.trainer
                if tokens is None:        # the epoch's sequence tokens, and padded's rows
                    ex, tok_sum, pad_sum = tr.train_ex, 0, 0
                    for step in range(steps):
                        for idx in tr.step_indices(step):
                            n = [len(ex[i].prompt) + len(r) for i in idx for r in ex[i].responses]
                            tok_sum, pad_sum = tok_sum + sum(n), pad_sum + len(n) * max(n)
                    tokens, padfrac = tok_sum / steps, pad_sum / tok_sum
                name = f"alignkit {packing} ({attn}{', bf16' if prec == 'bf16' else ''})"
                res[name] = mean_gap(clock)
                print(f"  {f} L={L} {name}: {res[name]:.2f} s", flush=True)
            if not a.no_trl:
                res["TRL DPOTrainer (live ref)"] = mean_gap(
                    run_trl(rows, L - 8, steps, tok_dir, work, False, profile_step=10**9))
                if a.bf16:
                    res["TRL DPOTrainer (live ref, bf16)"] = mean_gap(
                        run_trl(rows, L - 8, steps, tok_dir, work, False, profile_step=10**9,
                                bf16=True))
            pad = res["alignkit padded (auto)"]
            today = res.get("alignkit padded (sdpa)")
            trl = res.get("TRL DPOTrainer (live ref)")
            for name, t in res.items():
                out.append(f"| {f} | {L} | {name} | {t:.2f} | {tokens / t:.0f} | {pad / t:.2f}x | "
                           f"{f'{today / t:.2f}x' if today else '-'} | "
                           f"{f'{trl / t:.1f}x' if trl else '-'} | "
                           f"{padfrac:.2f} |")
                print(out[-1], flush=True)


def synthetic(a, work, out):
    """Today's attention (sdpa) against varlen (auto) per packing, on bench.trainer's synthetic
    rows (prompt L/2, responses L/2 each), 2 pairs per step: each run a fresh process
    (bench.trainer.fresh_run: its median step, the warm-up and the profiled steps left out), the
    two attentions alternating run by run. Run in one process, the same code's step spread by up
    to 30% between benches on the Zen 5 EPYC (shared_prompt varlen at L=1024: 1.27, 1.31, 1.72
    and 1.40 s in four benches of one session)."""
    from bench.trainer import fresh_run
    here = str(Path(__file__).resolve().parent.parent)
    out += ["", "### Synthetic rows: varlen (auto) against today's sdpa, per packing", "",
            "| L | packing | sdpa step s | varlen step s | varlen speed-up | median of the rounds' "
            "speed-ups |", "|---|---|---|---|---|---|"]
    for L in a.synthetic_lengths:
        for packing in a.synthetic_packings:
            t = {"sdpa": [], "auto": []}
            for _ in range(a.rounds):
                for attn in t:
                    r = fresh_run(f"{L},fp32,{packing},{a.steps},{attn}", here, here)
                    t[attn].append(r["step_s"])
            sd, vl = statistics.median(t["sdpa"]), statistics.median(t["auto"])
            # each round's two runs are minutes apart at most: their ratio loses most of the
            # machine's drift, which the ratio of the two medians keeps
            paired = statistics.median(x / y for x, y in zip(t["sdpa"], t["auto"]))
            out.append(f"| {L} | {packing} | {sd:.2f} | {vl:.2f} | {sd / vl:.2f}x | "
                       f"{paired:.2f}x |")
            print(out[-1], flush=True)


def cap(a, work, out):
    tok_dir = os.path.join(work, "tok")
    make_tokenizer(tok_dir)
    out += ["", f"### Step peak, one pair per step (MiB; cap {a.cap_gib:g} GiB)", "",
            "| packing | checkpointing | tiled MLP | " + " | ".join(f"L={L}" for L in a.cap_lengths)
            + " | peak ratio, last two L | longest L under cap |",
            "|---|---|---|" + "---|" * len(a.cap_lengths) + "---|---|"]
    cap_b = a.cap_gib * 2**30
    for packing in ("padded", "padding_free", "shared_prompt"):
        for ckpt, tiled in ((False, False), (True, False), (True, True)):
            peaks = []
            for L in a.cap_lengths:
                if peaks and (peaks[-1] is None or peaks[-1] > cap_b):   # past the cap
                    peaks.append(None)
                    continue
                t = time.time()
                clock = run_alignkit(make_rows(2, L, seed=L), L, 1, packing, tok_dir, work,
                                     batch=1, profile_step=1, gradient_checkpointing=ckpt,
                                     tiled_mlp=tiled, loss="simpo", reference="none")
                peaks.append(clock.peak)
                print(f"  cap {packing} ckpt={ckpt} tiled={tiled} L={L}: "
                      f"{clock.peak / 2**20:.0f} MiB ({time.time() - t:.0f} s)", flush=True)
            ok = [L for L, p in zip(a.cap_lengths, peaks) if p is not None and p <= cap_b]
            ratio = (f"{peaks[-1] / peaks[-2]:.2f}x" if None not in peaks[-2:] else "-")
            out.append(f"| {packing} | {'on' if ckpt else 'off'} | {'on' if tiled else 'off'} | "
                       + " | ".join(f"{p / 2**20:.0f}" if p else "-" for p in peaks)
                       + f" | {ratio} | {max(ok) if ok else '-'} |")
            print(out[-1], flush=True)


def synthetic_pairs(L: int, g: torch.Generator, n: int = 2):
    """n pairs of bench.trainer's synthetic shape as trainer Examples: prompt L/2, chosen and
    rejected L/2 each, random token ids from g."""
    from alignkit.train.data import Example

    def ids(k):
        return tuple(torch.randint(4, 32000, (k,), generator=g).tolist())
    return [Example(ids(L // 2), (ids(L // 2), ids(L // 2))) for _ in range(n)]


def direct(a, work, out):
    """The model module's forward + backward alone (SequenceLogprobs: body and fused head, no
    optimizer, data or logging) on one micro-batch of bench.trainer's synthetic shape (2 pairs,
    prompt L/2, responses L/2 each), per packing under today's sdpa and under varlen, one model
    init for both, interleaved in one process (alignkit.bench.harness.interleaved_times). The
    trainer-level runs (``synthetic``) carry the whole step's noise: there the same compute
    (padded, one kernel either way) read 0.94-1.06x."""
    from alignkit.bench.harness import interleaved_times
    from alignkit.train.config import TrainConfig
    from alignkit.train.loading import model_from_config
    from alignkit.train.model import SequenceLogprobs, forward_batch
    from alignkit.train.packing import collate
    varlen = TrainConfig(attn_implementation="auto").attention()
    out += ["", f"### The model module's fwd+bwd alone: varlen (auto) against today's sdpa "
            f"(median of {a.direct_rounds} interleaved rounds)", "",
            "| L | packing | sdpa s | varlen s | varlen speed-up |", "|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    models = {k: SequenceLogprobs(model_from_config(MODEL, attn)) for k, attn in
              (("sdpa", "sdpa"), ("varlen", varlen))}
    models["varlen"].model.load_state_dict(models["sdpa"].model.state_dict())
    for L in a.synthetic_lengths:
        exs = synthetic_pairs(L, g)
        steps = {}
        for packing in a.synthetic_packings:
            for kind, mod in models.items():
                batch = collate(exs, [0, 1], packing, 0,
                                attention="varlen" if kind == "varlen" else "dense")

                def step(mod=mod, batch=batch):
                    s, _ = forward_batch(mod, batch)
                    s.sum().backward()
                steps[(packing, kind)] = step
        t = interleaved_times(steps, warmup=1, reps=a.direct_rounds,
                              reset=lambda: [m.zero_grad(set_to_none=True)
                                             for m in models.values()])
        for packing in a.synthetic_packings:
            sd, vl = t[(packing, "sdpa")], t[(packing, "varlen")]
            out.append(f"| {L} | {packing} | {sd:.3f} | {vl:.3f} | {sd / vl:.2f}x |")
            print(out[-1], flush=True)


def shares(a, work, out):
    import alignkit.model.attention as attention
    from alignkit.train.config import TrainConfig
    from alignkit.train.loading import model_from_config
    from alignkit.train.model import SequenceLogprobs, forward_batch
    from alignkit.train.packing import collate
    causal = attention._causal
    out += ["", "### What attention and the MLP take of forward+backward (padding_free, varlen, "
            "2 pairs)", "", "| L per sequence | whole s | attention | MLP | rest (embedding, "
            "norms, projections, LM head) |", "|---|---|---|---|---|"]
    attn = TrainConfig(attn_implementation="auto").attention()
    g = torch.Generator().manual_seed(0)
    for L in a.share_lengths:
        exs = synthetic_pairs(L, g)
        batch = collate(exs, [0, 1], "padding_free", 0, attention="varlen")
        model = model_from_config(MODEL, attn)
        mlps = [layer.mlp for layer in model.model.layers]
        mod = SequenceLogprobs(model)

        def step(kind):
            # attention's per-sequence SDPA replaced by its values (the same shapes onward)
            attention._causal = (lambda q, k, v, *_: v.repeat_interleave(
                q.shape[1] // v.shape[1], 1)) if kind == "attn" else causal
            for layer, mlp in zip(model.model.layers, mlps):
                layer.mlp = torch.nn.Identity() if kind == "mlp" else mlp
            t = time.perf_counter()
            s, _ = forward_batch(mod, batch)
            s.sum().backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        times = {k: [] for k in ("whole", "attn", "mlp")}
        for r in range(a.share_rounds + 1):
            for k in times:
                dt = step(k)
                if r:
                    times[k].append(dt)
        attention._causal = causal
        w, at, ml = (statistics.median(times[k]) for k in ("whole", "attn", "mlp"))
        out.append(f"| {L} | {w:.2f} | {(w - at) / w:.0%} | {(w - ml) / w:.0%} | "
                   f"{1 - (w - at) / w - (w - ml) / w:.0%} |")
        print(out[-1], flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", default=["real", "synthetic", "direct", "cap", "shares"])
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--bf16", action="store_true",
                   help="real: the varlen packings, padding_free in bf16, and TRL in bf16 too")
    p.add_argument("--cap-gib", type=float, default=2.0)
    p.add_argument("--cap-lengths", default="8192,16384,32768")
    p.add_argument("--share-lengths", default="1024,8192")
    p.add_argument("--synthetic-lengths", default="512,1024")
    p.add_argument("--synthetic-packings", default="padded,padding_free,shared_prompt")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--share-rounds", type=int, default=3)
    p.add_argument("--direct-rounds", type=int, default=9)
    p.add_argument("--write", action="store_true", help="write bench/out/long_sequences.md")
    a = p.parse_args(argv)
    a.lengths = [int(x) for x in a.lengths.split(",")]
    a.cap_lengths = [int(x) for x in a.cap_lengths.split(",")]
    a.share_lengths = [int(x) for x in a.share_lengths.split(",")]
    a.synthetic_lengths = [int(x) for x in a.synthetic_lengths.split(",")]
    a.synthetic_packings = a.synthetic_packings.split(",")
    torch.set_num_threads(os.cpu_count())
    work = tempfile.mkdtemp(prefix="ak-bench-long-")
    out = [f"machine: {machine()}"]
    for part in a.parts:
        {"real": real, "synthetic": synthetic, "direct": direct, "cap": cap,
         "shares": shares}[part](a, work, out)
    emit(out, a.write, "long_sequences", "bench.long_sequences")


if __name__ == "__main__":
    main()
