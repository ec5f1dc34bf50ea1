"""A checkpoint, and every other file a run reads, is data: a crafted pickle placed in any of
them runs no code. The payload touches a marker file when unpickled (test_the_payload_is_live
shows it does); each test asserts the marker is absent and the run refuses the file or falls back
past it. Also: old pickled ``.pt`` checkpoints are refused with the command that converts them,
the conversion reaches the same weights, and the package holds no unpickling call."""
import ast
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from alignkit.cli import main  # noqa: E402
from alignkit.train import PreferenceTrainer  # noqa: E402
from alignkit.train.checkpoint import CheckpointError  # noqa: E402
from alignkit.train.config import ConfigError  # noqa: E402
from alignkit.train.data import DataError  # noqa: E402
from alignkit.train.state_files import read_tensors, read_tree, rng_from_tree  # noqa: E402
from tiny_run import Killed, MODEL, config, final_weights, kill_at, make_setup  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(max_steps=6, save_steps=2, eval_steps=0)
FILES = ["model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
         "rng-rank0.json", "rng-rank0.safetensors", "state.json"]
OLD = ["model.pt", "optimizer.pt", "scheduler.pt", "rng-rank0.pt"]


class Payload:
    """Unpickling this calls os.system: the shape of a real attack, with a harmless command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker):
    torch.save({"state": Payload(marker)}, str(path))


def test_the_payload_is_live(tmp_path):
    """The control: the planted file does run its command when something unpickles it."""
    plant(tmp_path / "x.pt", tmp_path / "ran")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("safety"))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    PreferenceTrainer(config(setup, out, **RUN)).train()
    return final_weights(out)


@pytest.fixture(scope="module")
def killed(setup, tmp_path_factory):
    """An output directory with checkpoints at steps 2 and 4, killed after step 5; tests copy
    it."""
    out = tmp_path_factory.mktemp("killed")
    with pytest.raises(Killed):
        PreferenceTrainer(config(setup, out, **RUN), callbacks=[kill_at(5)]).train()
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000004"]
    return out


def test_checkpoint_files_are_as_readable_as_any_file_the_run_writes(killed):
    step = killed / "checkpoints" / "step-00000004"
    assert sorted(os.listdir(step)) == sorted(FILES)
    mode = os.stat(step / "state.json").st_mode & 0o777          # written by open(): the umask's
    assert {n: os.stat(step / n).st_mode & 0o777 for n in FILES} == {n: mode for n in FILES}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _same_weights(out, uninterrupted):
    ours = final_weights(out)
    assert set(ours) == set(uninterrupted)
    for k, v in uninterrupted.items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("name", FILES)
def test_a_crafted_pickle_in_a_checkpoint_file_runs_nothing_and_resume_falls_back(
        setup, killed, uninterrupted, tmp_path, name):
    out = _copy(killed, tmp_path / "run")
    marker = tmp_path / "ran"
    plant(out / "checkpoints" / "step-00000004" / name, marker)
    logs = []
    with pytest.warns(RuntimeWarning, match=rf"step-00000004/{name}: cannot be read"):
        PreferenceTrainer(config(setup, out, **RUN), log=logs.append).train(resume=True)
    assert not marker.exists()
    assert any("resumed from" in m and "step-00000002" in m for m in logs), logs
    _same_weights(out, uninterrupted)


def test_crafted_pickles_in_every_file_through_the_cli_run_nothing(setup, killed, tmp_path,
                                                                    capsys):
    import yaml
    out = _copy(killed, tmp_path / "run")
    marker = tmp_path / "ran"
    for step in ("step-00000002", "step-00000004"):
        for name in FILES:
            plant(out / "checkpoints" / step / name, marker)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(setup, out, **RUN)))
    with pytest.warns(RuntimeWarning):
        assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: no intact checkpoint" in err and "Traceback" not in err
    assert "step-00000004/model.safetensors: cannot be read" in err
    assert not marker.exists()
    assert not os.path.exists(out / "final")


def _to_old_format(step_dir):
    """Rewrites a checkpoint as alignkit wrote them before safetensors: torch.save pickles."""
    torch.save(read_tensors(str(step_dir / "model.safetensors")), str(step_dir / "model.pt"))
    torch.save(read_tree(str(step_dir / "optimizer")), str(step_dir / "optimizer.pt"))
    torch.save(read_tree(str(step_dir / "scheduler")), str(step_dir / "scheduler.pt"))
    rng = rng_from_tree(read_tree(str(step_dir / "rng-rank0")), "rng")
    torch.save(rng, str(step_dir / "rng-rank0.pt"))
    for name in FILES:
        if name != "state.json":
            os.remove(step_dir / name)


@pytest.fixture(scope="module")
def old_run(killed, tmp_path_factory):
    out = _copy(killed, tmp_path_factory.mktemp("old") / "run")
    for step in ("step-00000002", "step-00000004"):
        _to_old_format(out / "checkpoints" / step)
    return out


def test_an_old_checkpoint_is_refused_then_converted_when_trusted(setup, old_run, uninterrupted,
                                                                  tmp_path, capsys):
    out = _copy(old_run, tmp_path / "run")
    newest = out / "checkpoints" / "step-00000004"
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError) as e:
        PreferenceTrainer(config(setup, out, **RUN)).train(resume=True)
    msg = str(e.value)
    assert f"{newest}/model.pt: a checkpoint of the old pickled format" in msg
    assert f"alignkit convert-checkpoint {newest} --trust" in msg
    # without --trust: refused before anything is read or written
    assert main(["convert-checkpoint", str(out)]) == 2
    assert "pass --trust if you trust" in capsys.readouterr().err
    assert sorted(os.listdir(newest)) == sorted(OLD + ["state.json"])
    assert main(["convert-checkpoint", str(out), "--trust"]) == 0
    assert sorted(os.listdir(newest)) == sorted(FILES)
    logs = []
    PreferenceTrainer(config(setup, out, **RUN), log=logs.append).train(resume=True)
    assert any("resumed from" in m and "step-00000004" in m for m in logs), logs
    _same_weights(out, uninterrupted)


@pytest.mark.parametrize("name", OLD)
def test_converting_a_crafted_old_checkpoint_runs_nothing(old_run, tmp_path, capsys, name):
    """Even with --trust, conversion reads with weights_only=True: the payload is refused."""
    step = _copy(old_run / "checkpoints" / "step-00000004", tmp_path / "step-00000004")
    marker = tmp_path / "ran"
    plant(step / name, marker)
    assert main(["convert-checkpoint", str(step), "--trust"]) == 2
    assert f"{step / name}: cannot be converted" in capsys.readouterr().err
    assert not marker.exists()
    assert sorted(os.listdir(step)) == sorted(OLD + ["state.json"])     # nothing written


def test_convert_checkpoint_names_a_bad_directory(tmp_path, capsys):
    assert main(["convert-checkpoint", str(tmp_path / "nope"), "--trust"]) == 2
    assert "nope: not a directory" in capsys.readouterr().err
    assert main(["convert-checkpoint", str(tmp_path), "--trust"]) == 2
    assert "holds no old-format checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- every other file a run reads
def test_a_crafted_reference_cache_runs_nothing_and_is_recomputed(setup, tmp_path):
    cache = tmp_path / "cache"
    cfg = config(setup, tmp_path / "a", max_steps=1, reference_cache_dir=str(cache))
    PreferenceTrainer(cfg).train()
    files = sorted(cache.iterdir())
    assert len(files) == 2 and all(f.suffix == ".safetensors" for f in files)
    marker = tmp_path / "ran"
    for f in files:
        plant(f, marker)
    logs = []
    with pytest.warns(RuntimeWarning,
                      match=r"reference cache .*ref-.*\.safetensors cannot be read"):
        PreferenceTrainer(dict(cfg, output_dir=str(tmp_path / "b")), log=logs.append).train()
    assert not marker.exists()
    assert sum("computed" in m for m in logs) == 2


@pytest.mark.parametrize("name", ["train.json", "train.jsonl"])
def test_a_pickle_given_as_data_is_a_data_error(setup, tmp_path, name):
    marker = tmp_path / "ran"
    plant(tmp_path / name, marker)
    with pytest.raises(DataError, match=rf"{name}.* not JSON"):
        PreferenceTrainer(config(setup, tmp_path / "out", data=str(tmp_path / name)))
    assert not marker.exists()


def test_a_config_with_python_tags_runs_nothing(setup, tmp_path, capsys):
    import yaml
    marker = tmp_path / "ran"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(setup, tmp_path / "out")) + f"lr: {tag}\n")
    assert main(["train", str(cfg)]) == 2
    assert f"config file {str(cfg)!r} is not plain YAML" in capsys.readouterr().err
    assert main(["train", "--tokenizer", str(setup / "tok"), "--lr", tag]) == 2
    assert "--lr: " in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(ConfigError, match="is not plain YAML"):
        from alignkit.train.config import TrainConfig
        TrainConfig.from_yaml(str(cfg))
    assert not marker.exists()


def _saved_model(setup, path):
    from alignkit.train.loading import model_from_config
    model_from_config(MODEL).save_pretrained(str(path))
    return path


def test_a_model_directory_with_remote_code_runs_none_of_it(setup, tmp_path):
    """from_pretrained without trust_remote_code: an auto_map naming a module in the directory
    is not imported (the marker would appear at import)."""
    model = _saved_model(setup, tmp_path / "model")
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"import os\nos.system('touch {marker}')\n")
    conf = json.loads((model / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (model / "config.json").write_text(json.dumps(conf))
    PreferenceTrainer(config(setup, tmp_path / "out", model_config=None, model=str(model),
                             max_steps=1))
    assert not marker.exists()


def test_a_model_directory_with_pickled_weights_runs_nothing(setup, tmp_path):
    model = _saved_model(setup, tmp_path / "model")
    os.remove(model / "model.safetensors")
    marker = tmp_path / "ran"
    plant(model / "pytorch_model.bin", marker)
    with pytest.raises(Exception):
        PreferenceTrainer(config(setup, tmp_path / "out", model_config=None, model=str(model)))
    assert not marker.exists()


# ---------------------------------------------------------------- the package itself
def _package_sources():
    root = os.path.join(REPO, "alignkit")
    for d, _, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


def test_the_package_holds_no_unpickling_call():
    """No weights_only=False, no pickle/dill/joblib loads, no trust_remote_code; every torch.load
    passes weights_only=True, and only the trusted converter calls it."""
    banned = ("weights_only=False", "pickle.load", "import pickle", "from pickle", "cPickle",
              "dill.load", "joblib.load", "allow_pickle=True", "trust_remote_code=")
    hits, loaders = [], set()
    sources = list(_package_sources())
    assert len(sources) > 30
    for path in sources:
        text = open(path, encoding="utf-8").read()
        compact = "".join(text.split())
        hits += [f"{path}: {b}" for b in banned if "".join(b.split()) in compact]
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                loaders.add(os.path.relpath(path, REPO))
                kw = {k.arg: k.value for k in node.keywords}
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    hits.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert hits == []
    assert loaders == {os.path.join("alignkit", "train", "checkpoint_convert.py")}
