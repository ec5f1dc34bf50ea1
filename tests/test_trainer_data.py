"""Data shapes, prompt masking, truncation, malformed rows, and config validation."""
import json
import os

import pytest

pytest.importorskip("transformers")

from alignkit.train.config import ConfigError, TrainConfig, parse_overrides  # noqa: E402
from alignkit.train.data import DataError, Tokenise, load_rows, tokenise_rows  # noqa: E402


def test_sharegpt_rows_mask_the_prompt_and_keep_the_response(tok, data_dir):
    for name in ("dpo_en_demo.json", "dpo_zh_demo.json"):
        rows = load_rows(os.path.join(data_dir, name))
        exs = tokenise_rows(rows, Tokenise(tok, 4096, 2048, True))
        assert len(exs) == len(rows) == 300
        for row, ex in list(zip(rows, exs))[:50]:
            for k, resp in zip(("chosen", "rejected"), ex.responses):
                text = tok.decode(resp)
                assert text == row[k]["value"] + "<|end|>\n", (name, k)
            prompt = tok.decode(ex.prompt)
            assert prompt.endswith("<|assistant|>\n")
            assert row["conversations"][-1]["value"][-200:] + "<|end|>" in prompt


def test_kto_rows(tok, data_dir):
    rows = load_rows(os.path.join(data_dir, "kto_en_demo.json"))
    exs = tokenise_rows(rows, Tokenise(tok, 4096, 2048, True), loss="kto")
    assert [e.desirable for e in exs] == [r["label"] for r in rows]
    assert tok.decode(exs[3].responses[0]) == rows[3]["messages"][-1]["content"] + "<|end|>\n"
    with pytest.raises(DataError, match="'kto'-shaped but loss 'dpo' reads pairs"):
        tokenise_rows(rows, Tokenise(tok, 4096, 2048, True), loss="dpo")


def test_pairs_and_messages_shapes_agree(tok):
    pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    msgs = [{"prompt": [{"role": "user", "content": "2+2?"}],
             "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    implicit = [{"chosen": msgs[0]["prompt"] + msgs[0]["chosen"],
                 "rejected": msgs[0]["prompt"] + msgs[0]["rejected"]}]
    tk = Tokenise(tok, 64, 32, True)
    a, b, c = (tokenise_rows(r, tk)[0] for r in (pairs, msgs, implicit))
    assert a == b == c


def test_truncation_keeps_the_prompts_end_and_the_responses_start(tok):
    row = {"prompt": "one two three four five six seven eight nine ten " * 8,
           "chosen": "alpha beta gamma delta " * 10, "rejected": "x"}
    full = tokenise_rows([row], Tokenise(tok, 4096, 2048, True))[0]
    cut = tokenise_rows([row], Tokenise(tok, 48, 16, True))[0]
    assert cut.prompt == full.prompt[-16:]
    assert cut.responses[0] == full.responses[0][:48 - 16]
    assert cut.responses[1] == full.responses[1]          # short enough already
    assert len(cut.prompt) + len(cut.responses[0]) == 48


def test_empty_response_is_kept_with_its_end_token(tok):
    ex = tokenise_rows([{"prompt": "q", "chosen": "", "rejected": "no"}],
                       Tokenise(tok, 64, 32, True))[0]
    assert tok.decode(ex.responses[0]) == "<|end|>\n"


def test_malformed_rows_are_reported_by_index_and_field(tok):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a", "chosen": 3, "rejected": "c"},
            {"prompt": "a", "chosen": "b"},
            {"prompt": "a", "chosen": "b", "rejected": "c"}]
    with pytest.raises(DataError) as e:
        tokenise_rows(rows, Tokenise(tok, 64, 32, True))
    msg = str(e.value)
    assert "2 malformed row(s) of 4" in msg
    assert "row 1: chosen" in msg and "row 2: rejected" in msg
    with pytest.raises(DataError, match="no rows"):
        tokenise_rows([], Tokenise(tok, 64, 32, True))
    with pytest.raises(DataError, match="match no known shape"):
        tokenise_rows([{"question": "a"}], Tokenise(tok, 64, 32, True))


def test_jsonl_and_missing_files(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n\n{bad\n")
    with pytest.raises(DataError, match="line 3 is not JSON"):
        load_rows(str(p))
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.json"))


BASE = dict(model_config={"model_type": "llama"}, tokenizer="tok")


@pytest.mark.parametrize("over,match", [
    ({"learning_rate": 1e-4}, r"unknown config key\(s\) \['learning_rate'\]"),
    ({"packing": "flat"}, "packing must be one of padded, padding_free, shared_prompt"),
    ({"max_prompt_length": 2048}, "max_prompt_length .* must be below max_length"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"lr": -1}, "lr must be a finite number > 0"),
    ({"loss": "kto", "packing": "shared_prompt"}, "shared_prompt needs pairs"),
    ({"loss": "simpo", "reference": "live"}, "reference-free"),
    ({"loss_options": {"gamma": 1.0}}, "do not apply to loss 'dpo'"),
    ({"loss_options": {"softcap": 30.0}}, "set by the trainer"),
    ({"packing": "shared_prompt", "gradient_checkpointing": True, "attn_implementation": "sdpa"},
     "KV cache"),
    ({"attn_implementation": "flash"}, "attn_implementation must be one of auto, varlen"),
    ({"attn_implementation": "flash_attention_2"},     # no CUDA here (tests/test_attention.py)
     "attn_implementation flash_attention_2: flash-attn runs on CUDA only"),
    ({"model": "m"}, "give model or model_config, not both"),
])
def test_config_errors_name_the_key(over, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({**BASE, **over})


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model_config: {model_type: llama}\ntokenizer: tok\nloss: simpo\n"
                 "loss_options: {beta: 2.0, gamma: 0.5}\n")
    cfg = TrainConfig.from_yaml(str(p), parse_overrides(["--lr", "1e-4", "--packing=padded"]))
    assert (cfg.lr, cfg.packing, cfg.loss, cfg.reference) == (1e-4, "padded", "simpo", "none")
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--lr"])
