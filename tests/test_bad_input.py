"""Every bad input raises an error that names the argument and what was expected."""
import os

import pytest
import torch

import alignkit


def _ok(N=4, H=8, V=20):
    return torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))


@pytest.mark.parametrize("label,match", [(20, r"labels must be in \[0, 20\)"),
                                         (-1, r"labels must be in \[0, 20\)")])
def test_label_out_of_range(backend, label, match):
    h, W, y = _ok()
    y[2] = label
    with pytest.raises(ValueError, match=match):
        alignkit.linear_token_logprobs(h, W, y, backend=backend)
    with pytest.raises(ValueError, match=match):
        alignkit.token_logprobs(h @ W.t(), y, backend=backend)


def test_shapes_and_types():
    h, W, y = _ok()
    with pytest.raises(ValueError, match=r"hidden's last dim must equal weight's H=8"):
        alignkit.linear_token_logprobs(torch.randn(4, 9), W, y)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        alignkit.linear_token_logprobs(h, W, y[:3])
    with pytest.raises(ValueError, match=r"weight must be 2-D \[V, H\]"):
        alignkit.linear_token_logprobs(h, W[None], y)
    with pytest.raises(TypeError, match=r"hidden must be a floating tensor"):
        alignkit.linear_token_logprobs(h.long(), W, y)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        alignkit.linear_token_logprobs(h, W, y.float())
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \(20,\)"):
        alignkit.linear_token_logprobs(h, W, y, bias=torch.zeros(19))
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        alignkit.linear_token_logprobs(h, W, y, temperature=0.0)
    with pytest.raises(ValueError, match=r"softcap must be None or a finite number > 0"):
        alignkit.linear_token_logprobs(h, W, y, softcap=-1.0)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        alignkit.linear_token_logprobs(h, W, y, backend="cuda")
    with pytest.raises(ValueError, match=r"labels must have shape \(4, 5\) \(logits.shape\[:-1\]\), got \(4,\)"):
        alignkit.token_logprobs(torch.randn(4, 5, 20), y)
    with pytest.raises(ValueError, match=r"segment_ids must have the shape of labels"):
        alignkit.sequence_logprobs(h, W, y, segment_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"padded input needs hidden \[S, T, H\]"):
        alignkit.sequence_logprobs(h, W, y)


def test_devices():
    h, W, y = _ok()
    with pytest.raises(ValueError, match=r"all inputs must be on one device"):
        alignkit.linear_token_logprobs(h, W.to("meta"), y)


def test_triton_on_cpu_without_interpreter_is_clear(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, W, y = _ok()
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors, or on CPU "
                                         r"tensors under TRITON_INTERPRET=1"):
        alignkit.linear_token_logprobs(h, W, y, backend="triton")


# ----------------------------------------------------------------------------- the ops and losses
def test_hidden_size_zero_is_refused():
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with V >= 1 and H >= 1"):
        alignkit.linear_token_logprobs(torch.randn(4, 0), torch.randn(20, 0),
                                       torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kw", [dict(temperature=True), dict(softcap=True),
                                dict(return_entropy=1)])
def test_bools_are_not_numbers(kw):
    h, W, y = _ok()
    with pytest.raises((TypeError, ValueError), match=list(kw)[0]):
        alignkit.linear_token_logprobs(h, W, y, **kw)


def test_segment_ids_are_checked_before_any_work(monkeypatch):
    import alignkit.api as api
    calls = []
    monkeypatch.setattr(api, "linear_token_logprobs", lambda *a, **k: calls.append(1))
    h, W, y = _ok(N=6)
    bad = [(torch.tensor([0, 0, 0, 1, 1, 2**40]), r"segment_ids has max 1099511627776, more "
                                                  r"segments than the 6 tokens"),
           (torch.tensor([0, 0, 0, 1, 1, -1]), r"segment_ids must be >= 0"),
           (torch.zeros(6), r"segment_ids must be an integer tensor"),
           (torch.zeros(7, dtype=torch.long), r"segment_ids must have the shape of labels"),
           (torch.zeros(5, dtype=torch.long), r"segment_ids must have the shape of labels")]
    for seg, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            alignkit.sequence_logprobs(h, W, y, segment_ids=seg)
    with pytest.raises(ValueError, match=r"segment_ids must be < num_segments=2, got 2"):
        alignkit.sequence_logprobs(h, W, y, segment_ids=torch.tensor([0, 0, 1, 1, 2, 2]),
                                   num_segments=2)
    assert calls == []                                     # refused before the op ran


@pytest.mark.parametrize("grad_mode", ["auto", "single_pass", "recompute"])
def test_preference_loss_checks_labels_and_segments_on_every_path(grad_mode):
    hh, ww = torch.randn(2, 6, 16), torch.randn(40, 16) * .5
    yy = torch.randint(0, 40, (2, 6))
    yy[0, 3] = 40
    with pytest.raises(ValueError, match=r"labels must be in \[0, 40\)"):
        alignkit.preference_loss(hh, ww, yy, loss="simpo", grad_mode=grad_mode)
    h, y = torch.randn(12, 16), torch.randint(0, 40, (12,))
    for seg, match in [(torch.zeros(13, dtype=torch.long), "segment_ids must have the shape"),
                       (torch.tensor([0] * 6 + [1] * 5 + [-1]), "segment_ids must be >= 0"),
                       (torch.zeros(12), "segment_ids must be an integer tensor"),
                       (torch.tensor([0] * 6 + [1] * 5 + [2**40]), "more segments than")]:
        with pytest.raises((ValueError, TypeError), match=match):
            alignkit.preference_loss(h, ww, y, loss="simpo", segment_ids=seg,
                                     grad_mode=grad_mode)


@pytest.mark.parametrize("kw,match", [
    (dict(gamma=float("nan")), r"gamma must be a finite number"),
    (dict(gamma=float("inf")), r"gamma must be a finite number"),
    (dict(beta=True), r"beta must be a finite number > 0"),
    (dict(label_smoothing=float("nan")), r"label_smoothing must be in \[0, 0.5\)"),
])
def test_simpo_options_must_be_finite(kw, match):
    from alignkit.losses import simpo_loss
    with pytest.raises(ValueError, match=match):
        simpo_loss(torch.zeros(2), torch.zeros(2), **kw)


def test_kto_loss_edges():
    from alignkit.losses import kto_loss
    z, d = torch.zeros(0, requires_grad=True), torch.zeros(0, dtype=torch.bool)
    loss, _ = kto_loss(z, z.detach(), d)                   # an empty batch: 0, not NaN
    assert loss.item() == 0.0
    loss.backward()
    p, r = torch.randn(3, requires_grad=True), torch.randn(3)
    d = torch.tensor([True, False, True])
    for w in (float("nan"), float("inf"), 0.0, "x"):
        with pytest.raises(ValueError, match=r"desirable_weight must be a finite number > 0"):
            kto_loss(p, r, d, desirable_weight=w)
    with pytest.raises(ValueError, match=r"undesirable_weight must be a finite number > 0"):
        kto_loss(p, r, d, undesirable_weight=float("nan"))
    a, _ = kto_loss(p, r, d, kl=0.5)                       # a float z0 works like a tensor one
    b, _ = kto_loss(p, r, d, kl=torch.tensor(0.5))
    assert a.item() == b.item()
    with pytest.raises(ValueError, match=r"kl must be a finite number >= 0"):
        kto_loss(p, r, d, kl=float("nan"))
    with pytest.raises(ValueError, match=r"ref_kl_logps must have the shape of policy_kl_logps "
                                         r"\(4,\), got \(3,\)"):
        kto_loss(p, r, d, policy_kl_logps=torch.zeros(4), ref_kl_logps=torch.zeros(3))


# ----------------------------------------------------------------------------- the trainer config
transformers = pytest.importorskip("transformers")
from alignkit.train.config import ConfigError, TrainConfig  # noqa: E402

BASE = dict(model_config={"model_type": "llama"}, tokenizer="tok")


@pytest.mark.parametrize("key", ["lr", "weight_decay", "eval_fraction", "max_grad_norm"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_every_float_option_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number"):
        TrainConfig.from_dict({**BASE, key: value})


def test_weight_decay_must_be_non_negative():
    with pytest.raises(ConfigError, match=r"weight_decay must be a finite number >= 0; got -5.0"):
        TrainConfig.from_dict({**BASE, "weight_decay": -5.0})


@pytest.mark.parametrize("key", ["append_eos", "gradient_checkpointing", "fsdp", "progress",
                                 "tensorboard"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_bool_fields_are_type_checked(key, value):
    with pytest.raises(ConfigError, match=rf"{key} must be true or false; got {value!r}"):
        TrainConfig.from_dict({**BASE, key: value})


@pytest.mark.parametrize("key,value,match", [
    ("data", 5, "data must be a path"), ("output_dir", "", "output_dir must be a non-empty"),
    ("model_config", [1], "model_config must be a mapping"), ("backend", "gpu", "backend must be one of")])
def test_other_fields_are_type_checked(key, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({**BASE, key: value})


@pytest.mark.parametrize("loss,options,call", [
    ("dpo", {"beta": -0.1}, "dpo"), ("dpo", {"loss_type": "bogus"}, "dpo"),
    ("dpo", {"label_smoothing": 0.7}, "dpo"), ("simpo", {"gamma": float("nan")}, "simpo"),
    ("cpo", {"cpo_alpha": -1.0}, "cpo"), ("kto", {"desirable_weight": "x"}, "kto"),
    ("kto", {"beta": 0.0}, "kto")])
def test_loss_options_are_checked_at_load_with_the_losses_messages(loss, options, call):
    from alignkit.losses import kto_loss, logprob_loss
    z = torch.zeros(2)
    with pytest.raises(ValueError) as direct:                 # what the loss itself says
        if call == "kto":
            kto_loss(z, z, torch.ones(2, dtype=torch.bool), **options)
        else:
            logprob_loss(z, torch.ones(2), loss=loss, ref_logprobs=z if loss == "dpo" else None,
                         **options)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**BASE, "loss": loss, "loss_options": options})
    assert str(e.value) == f"loss_options: {direct.value}"


def _tiny_setup(tmp_path):
    from tiny_run import config, make_setup
    return config(make_setup(tmp_path), tmp_path / "out", max_steps=1, eval_data=None)


def test_vocab_size_below_the_tokenizer_is_refused_before_the_model_is_built(tmp_path,
                                                                             monkeypatch):
    import alignkit.train.loading as tr
    from alignkit.train import PreferenceTrainer
    built = []
    monkeypatch.setattr(tr, "model_from_config", lambda *a, **k: built.append(1))
    cfg = _tiny_setup(tmp_path)
    cfg["model_config"] = dict(cfg["model_config"], vocab_size=5)
    with pytest.raises(ConfigError, match=r"model_config.vocab_size \(5\) must be an integer >= "
                                          r"the tokenizer's 19 tokens"):
        PreferenceTrainer(cfg)
    assert built == []
    monkeypatch.undo()
    # a model object with a too-small embedding is refused before any data is read
    from alignkit.train.loading import model_from_config
    small = model_from_config(dict(cfg["model_config"], vocab_size=10))
    with pytest.raises(ConfigError, match=r"embedding has 10 rows \(vocab_size\) but the "
                                          r"tokenizer has 19 tokens"):
        PreferenceTrainer(_tiny_setup(tmp_path), model=small)


def test_objects_given_need_no_model_or_tokenizer_keys(tmp_path):
    from transformers import AutoTokenizer

    from alignkit.train import PreferenceTrainer
    from alignkit.train.loading import model_from_config
    cfg = _tiny_setup(tmp_path)
    tok = AutoTokenizer.from_pretrained(cfg.pop("tokenizer"))
    model = model_from_config(cfg.pop("model_config"))
    assert PreferenceTrainer(cfg, model=model, tokenizer=tok).train()["loss"] > 0
    with pytest.raises(ConfigError, match=r"give model \(a local transformers directory\) or "
                                          r"model_config"):
        PreferenceTrainer(cfg, tokenizer=tok)
    with pytest.raises(ConfigError, match=r"give tokenizer"):
        PreferenceTrainer(dict(cfg, model_config=_tiny_setup(tmp_path)["model_config"]))


def test_a_saved_model_is_loaded_with_dtype_not_torch_dtype(tmp_path, monkeypatch):
    import alignkit.train.loading as tr
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k) or real(*a, **k))
    cfg = _tiny_setup(tmp_path)
    tr.model_from_config(cfg["model_config"]).save_pretrained(str(tmp_path / "m"))
    cfg = dict(cfg, model=str(tmp_path / "m"), model_config=None)
    tr.load_model(TrainConfig.from_dict(cfg))
    assert seen and "dtype" in seen[0] and "torch_dtype" not in seen[0]


def test_cli_train_without_a_yaml(tmp_path, capsys):
    from alignkit.cli import main
    assert main(["train", "--max_steps", "2", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "give model (a local transformers directory) or model_config" in err, err
    import json
    cfg = _tiny_setup(tmp_path)
    args = ["train"]
    for k in ("model_config", "tokenizer", "data", "output_dir", "max_length",
              "max_prompt_length", "max_steps", "progress", "tensorboard", "precision",
              "reference_cache_dir"):
        args += [f"--{k}", json.dumps(cfg[k]) if not isinstance(cfg[k], str) else cfg[k]]
    assert main(args) == 0
    assert os.path.isfile(tmp_path / "out" / "final" / "config.json")
