"""The tiny trainer setup shared by the loop tests and the fault tests: a 2-layer random Llama,
the demo's word-level tokenizer, 40 training and 8 eval pairs of the demo task, and a KTO set."""
import json

from alignkit.train.demo import build_tokenizer, make_rows

MODEL = dict(model_type="llama", vocab_size=24, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False)


def make_setup(root):
    build_tokenizer(str(root / "tok"))
    rows = make_rows(48, seed=3)
    with open(root / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:40])
    with open(root / "eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[40:])
    kto = [{"messages": r["prompt"] + r[k], "label": k == "chosen"} for r in rows
           for k in ("chosen", "rejected")]
    with open(root / "kto.json", "w") as f:
        json.dump(kto, f)
    return root


def config(setup, out, **kw):
    base = dict(model_config=MODEL, tokenizer=str(setup / "tok"),
                data=str(setup / "train.jsonl"), eval_data=str(setup / "eval.jsonl"),
                max_length=40, max_prompt_length=24, output_dir=str(out), batch_size=4,
                max_steps=3, lr=1e-3, precision="fp32", progress=False, tensorboard=False,
                reference_cache_dir=str(setup / "cache"), seed=0)
    base.update(kw)
    return base


def final_weights(out):
    import os

    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "model.safetensors"))


def assert_weights_close(b, a, lr):
    """Two runs' final weights equal to fp32 round-off as Adam amplifies it. Adam normalises each
    element's step to about lr, so an element whose gradient is itself round-off-sized (its
    terms cancel) moves by a fraction of lr when the summation order changes: two ranks'
    all-reduce against one rank's accumulation, or another CPU's GEMM kernels (4.8e-6 = 0.5% of
    lr=1e-3 on one of 2048 elements, on an AVX2 EPYC). So atol is 1% of lr, far below the 2·lr
    of one step taken the wrong way. Returns the number of tensors compared."""
    import torch
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=0.01 * lr,
                                   msg=lambda m: f"{k}: {m}")
    return len(a)


class Killed(Exception):
    """Raised by kill_at's callback: a run stopped mid-way, as a SIGKILL would leave it."""


def kill_at(step):
    """A trainer callback that stops the run once `step` optimizer steps are done."""
    def cb(trainer, done, rec):
        if done == step:
            raise Killed
    return cb
