"""Faults a run must survive or name: a truncated file in the newest checkpoint (resume goes
through the previous one and reaches the weights of an uninterrupted run), no intact checkpoint
(an error naming the files), a checkpoint past max_steps, a partial metrics line, a truncated
reference cache."""
import os

import pytest
import torch

pytest.importorskip("transformers")

from alignkit.cli import main  # noqa: E402
from alignkit.train import PreferenceTrainer  # noqa: E402
from alignkit.train.checkpoint import CheckpointError  # noqa: E402
from alignkit.train.config import ConfigError  # noqa: E402
from alignkit.train.metrics import read_metrics  # noqa: E402
from tiny_run import Killed, config, final_weights, kill_at, make_setup  # noqa: E402

RUN = dict(max_steps=6, save_steps=2, eval_steps=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    PreferenceTrainer(config(setup, out, **RUN)).train()
    return final_weights(out)


def _killed_run(setup, out):
    """Checkpoints at steps 2 and 4 (the two newest kept), killed after step 5."""
    with pytest.raises(Killed):
        PreferenceTrainer(config(setup, out, **RUN), callbacks=[kill_at(5)]).train()
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["step-00000002", "step-00000004"], names
    return out / "checkpoints" / "step-00000004"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.json", "optimizer.safetensors",
                                  "scheduler.json", "rng-rank0.json", "rng-rank0.safetensors",
                                  "state.json"])
def test_a_truncated_checkpoint_file_resumes_from_the_previous_one(setup, uninterrupted,
                                                                   tmp_path, name):
    newest = _killed_run(setup, tmp_path)
    _truncate(newest / name)
    logs = []
    with pytest.warns(RuntimeWarning, match=rf"{name}: cannot be read"):
        PreferenceTrainer(config(setup, tmp_path, **RUN), log=logs.append).train(resume=True)
    assert any("resumed from" in m and "step-00000002" in m for m in logs), logs
    ours = final_weights(tmp_path)
    for k, v in uninterrupted.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    steps = [r["step"] for r in read_metrics(str(tmp_path)) if r.get("split", "train") == "train"]
    assert steps == list(range(1, 7))


def test_no_intact_checkpoint_is_an_error_naming_the_files(setup, tmp_path, capsys):
    newest = _killed_run(setup, tmp_path)
    _truncate(newest / "model.safetensors")
    _truncate(newest.parent / "step-00000002" / "state.json")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError) as e:
        PreferenceTrainer(config(setup, tmp_path, **RUN)).train(resume=True)
    assert "no intact checkpoint" in str(e.value)
    assert "step-00000004/model.safetensors" in str(e.value)
    assert "step-00000002/state.json" in str(e.value)
    # the CLI: exit 2 and one line naming them, no traceback
    cfg = tmp_path / "c.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump(config(setup, tmp_path, **RUN)))
    with pytest.warns(RuntimeWarning):
        assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: no intact checkpoint" in err and "Traceback" not in err


def test_a_checkpoint_past_max_steps_is_refused(setup, tmp_path):
    _killed_run(setup, tmp_path)
    with pytest.raises(ConfigError, match=r"max_steps: 3 is below the step of the checkpoint to "
                                          r"resume \(4, .*state.json\)"):
        PreferenceTrainer(config(setup, tmp_path, **dict(RUN, max_steps=3))).train(resume=True)
    assert not os.path.exists(tmp_path / "final")


def test_a_partial_metrics_line_is_dropped_with_a_warning(setup, uninterrupted, tmp_path):
    _killed_run(setup, tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.6')             # a write cut short
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl: line 6 is not a complete"):
        PreferenceTrainer(config(setup, tmp_path, **RUN)).train(resume=True)
    recs = [r for r in read_metrics(str(tmp_path)) if r.get("split", "train") == "train"]
    assert [r["step"] for r in recs] == list(range(1, 7))
    for k, v in uninterrupted.items():
        torch.testing.assert_close(final_weights(tmp_path)[k], v, rtol=1e-6, atol=1e-7)


def test_a_truncated_reference_cache_is_recomputed(setup, tmp_path):
    cache = tmp_path / "cache"
    cfg = config(setup, tmp_path / "a", max_steps=1, reference_cache_dir=str(cache))
    first = PreferenceTrainer(cfg).train()
    files = sorted(cache.iterdir())
    assert len(files) == 2                                # train and eval tables
    _truncate(files[0])
    logs = []
    with pytest.warns(RuntimeWarning,
                      match=r"reference cache .*ref-.*\.safetensors cannot be read"):
        again = PreferenceTrainer(dict(cfg, output_dir=str(tmp_path / "b")),
                                  log=logs.append).train()
    assert sum("computed" in m for m in logs) == 1 and sum("cache hit" in m for m in logs) == 1
    assert again["loss"] == first["loss"]
