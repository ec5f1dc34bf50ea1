"""Reward-model training (loss: reward): the scores at each sequence's last token in every packing
against the model's own forward, the ranking loss against a float64 brute force, the trainer on
pairs and on ranked rows (K varies), metrics on train and eval, the saved model loaded back as a
reward model, a CausalLM turned into one, SFT (loss: sft), and DDP / FSDP2 against one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alignkit.losses import reward_ranking_loss  # noqa: E402
from alignkit.model.reward_model import (  # noqa: E402
    SequenceScores,
    as_reward_model,
    is_reward_model,
    score_sequences,
)
from alignkit.train import PreferenceTrainer  # noqa: E402
from alignkit.train.config import ConfigError  # noqa: E402
from alignkit.train.data import DataError  # noqa: E402
from alignkit.train.metrics import read_metrics  # noqa: E402
from alignkit.train.packing import collate  # noqa: E402
from tiny_run import MODEL, assert_weights_close, config, final_weights, make_setup  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_setup(tmp_path_factory.mktemp("rm"))
    rows = [json.loads(x) for x in open(root / "train.jsonl")]
    ranked = []
    for i, r in enumerate(rows):          # K = 2..4: sorted, then worse and worse
        good = r["chosen"][0]["content"].split()
        k = 2 + i % 3
        worse = [" ".join(good[::-1]), r["rejected"][0]["content"], " ".join(good[1:])][:k - 1]
        ranked.append({"prompt": r["prompt"], "responses": [" ".join(good)] + worse})
    (root / "ranked.json").write_text(json.dumps(ranked))
    margin = [dict(r, margin=0.5 * (i % 2)) for i, r in enumerate(rows)]
    (root / "margin.json").write_text(json.dumps(margin))
    sft = [{"messages": r["prompt"] + r["chosen"]} for r in rows]
    (root / "sft.json").write_text(json.dumps(sft))
    return root


def test_scores_at_the_last_token_match_the_models_own_forward(setup):
    t = PreferenceTrainer(config(setup, setup / "o0", loss="reward"))
    rm = t.model.eval()
    idx = [0, 1, 2, 3]
    exs = t.train_ex
    ids = [list(exs[i].prompt + exs[i].responses[k]) for k in (0, 1) for i in idx]
    L = max(map(len, ids))
    x = torch.tensor([s + [t.pad_id] * (L - len(s)) for s in ids])
    am = (torch.arange(L)[None] < torch.tensor([len(s) for s in ids])[:, None]).long()
    with torch.no_grad():
        own = rm(input_ids=x, attention_mask=am).logits.squeeze(-1)   # HF: last non-pad token
        assert t.attention == "varlen"          # the trainer's default attention
        for packing in ("padded", "padding_free", "shared_prompt"):
            for attention in ("dense", "varlen"):
                b = collate(exs, idx, packing, t.pad_id, attention=attention)
                got = SequenceScores(rm)(b.input_ids, b.position_ids, b.attention_mask, b.last,
                                         b.input_ids2, b.position_ids2, b.attention_mask2,
                                         b.prefix, b.layout)
                torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-5,
                                           msg=f"{packing} {attention}")
        torch.testing.assert_close(score_sequences(rm, x, am), own, rtol=1e-5, atol=1e-5)
    assert own.std() > 0                     # distinct scores: a misplaced index would show


def test_ranking_loss_brute_force_and_gradient():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    n = [2, 5, 3, 4]
    m = torch.tensor([0.0, 0.3, -0.2, 1.0], dtype=torch.float64)
    loss, met = reward_ranking_loss(r, n, margin=m, center_rewards_coefficient=0.05)
    want, acc = 0.0, 0.0
    for p in range(4):
        pairs = [(i, j) for i in range(n[p]) for j in range(i + 1, n[p])]
        want += sum(-torch.nn.functional.logsigmoid(r[p, i] - r[p, j] - m[p])
                    for i, j in pairs) / len(pairs) / 4
        acc += sum(float(r[p, i] > r[p, j]) for i, j in pairs) / len(pairs) / 4
        want = want + 0.05 * r[p, :n[p]].sum() ** 2 / 4
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert met["rewards/accuracies"].item() == pytest.approx(acc)
    assert met["rewards/rejected"].item() == pytest.approx(
        sum(r[p, n[p] - 1].item() for p in range(4)) / 4)
    ga, = torch.autograd.grad(loss, r)
    gb, = torch.autograd.grad(want, r)
    torch.testing.assert_close(ga, gb)
    assert (ga[0, 2:] == 0).all()                   # padding is never read
    # K = 2 is TRL's RewardTrainer loss: −logσ(c − r − m) + c·mean((c + r)²)
    c, rj = r[:, 0].detach(), r[:, 1].detach()
    l2, _ = reward_ranking_loss(torch.stack([c, rj], 1), margin=m,
                                center_rewards_coefficient=0.01)
    trl = -torch.nn.functional.logsigmoid(c - rj - m).mean() + 0.01 * ((c + rj) ** 2).mean()
    torch.testing.assert_close(l2, trl)
    with pytest.raises(ValueError, match="num_responses must be"):
        reward_ranking_loss(r, [1, 5, 3, 4])


@pytest.mark.parametrize("packing,data", [("padded", "train.jsonl"),
                                          ("padding_free", "ranked.json"),
                                          ("shared_prompt", "margin.json")])
def test_reward_training_learns_and_saves_a_reward_model(setup, tmp_path, packing, data):
    cfg = config(setup, tmp_path, loss="reward", packing=packing, data=str(setup / data),
                 max_steps=12, lr=3e-3, eval_steps=6,
                 loss_options={"center_rewards_coefficient": 0.01})
    t = PreferenceTrainer(cfg)
    if data == "ranked.json":
        assert sorted({len(e.responses) for e in t.train_ex}) == [2, 3, 4]
    if data == "margin.json":
        assert {e.margin for e in t.train_ex} == {0.0, 0.5}
    t.train()
    recs = read_metrics(str(tmp_path))
    train = [r for r in recs if r.get("split", "train") == "train"]
    evals = [r for r in recs if r.get("split") == "eval"]
    keys = {"loss", "rewards/accuracies", "rewards/margins", "rewards/mean", "rewards/chosen",
            "rewards/rejected"}
    assert all(keys <= set(r) for r in train + evals) and len(evals) == 2
    assert train[-1]["loss"] < train[0]["loss"]
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    assert is_reward_model(rm) and rm.config.num_labels == 1
    assert rm.config.pad_token_id == t.pad_id
    w = final_weights(tmp_path)
    assert "score.weight" in w and not any(k.startswith("lm_head") for k in w)
    b = collate(t.eval_ex, [0, 1], "padded", t.pad_id)
    with torch.no_grad():
        mine = SequenceScores(t.model.eval())(b.input_ids, b.position_ids, b.attention_mask,
                                              b.last)
        own = rm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(own, mine, rtol=1e-5, atol=1e-6)


def test_a_causal_lm_becomes_a_reward_model_with_its_body(setup, tmp_path):
    lm = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**MODEL))
    rm = as_reward_model(lm, pad_token_id=0)
    assert is_reward_model(rm) and not hasattr(rm, "lm_head")
    for k, v in lm.get_decoder().state_dict().items():
        assert torch.equal(rm.model.state_dict()[k], v), k
    cfg = config(setup, tmp_path, loss="reward", max_steps=2)
    tok = transformers.AutoTokenizer.from_pretrained(str(setup / "tok"))
    t = PreferenceTrainer(dict(cfg, model_config=None), model=lm, tokenizer=tok)
    assert is_reward_model(t.model)
    t.train()
    assert "score.weight" in final_weights(tmp_path)


def test_sft_trains_on_the_response_tokens(setup, tmp_path):
    calls = []
    cfg = config(setup, tmp_path / "a", loss="sft", data=str(setup / "sft.json"), max_steps=8,
                 lr=3e-3, eval_data=None, packing="padding_free")
    t = PreferenceTrainer(cfg, callbacks=[lambda tr, s, rec: calls.append(rec["nll"])])
    assert all(len(e.responses) == 1 for e in t.train_ex)
    t.train()
    assert calls[-1] < calls[0]
    # pairs rows: the chosen responses, the same examples as the messages rows above
    t2 = PreferenceTrainer(config(setup, tmp_path / "b", loss="sft", eval_data=None))
    assert [e.responses for e in t2.train_ex] == [e.responses for e in t.train_ex]
    with pytest.raises(ConfigError, match="shared_prompt needs pairs; loss sft"):
        PreferenceTrainer(dict(cfg, packing="shared_prompt"))


def test_sft_objective_runs_sft_loss(setup, tmp_path, monkeypatch):
    # loss: sft is alignkit.sft_loss inside the model module, its options from loss_options
    # (sft_loss itself is checked against the oracle in test_sft.py); a bad option is refused
    # by name when the config is read
    import alignkit.train.model as model_mod
    calls = []
    real = model_mod.sft_loss
    monkeypatch.setattr(model_mod, "sft_loss",
                        lambda *a, **k: calls.append(k.get("label_smoothing")) or real(*a, **k))
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    recs = []
    cfg = config(setup, tmp_path / "s", loss="sft", data=str(setup / "sft.json"), max_steps=2,
                 eval_data=None, loss_options=opts)
    PreferenceTrainer(cfg, callbacks=[lambda tr, s, rec: recs.append(rec)]).train()
    assert calls and set(calls) == {0.1}
    assert {"sft", "entropy", "mean_token_accuracy", "tokens"} <= set(recs[0])
    with pytest.raises(ConfigError, match="label_smoothing"):
        PreferenceTrainer(dict(cfg, loss_options={"label_smoothing": 2.0}))
    with pytest.raises(ConfigError, match="beta"):
        PreferenceTrainer(dict(cfg, loss_options={"beta": 0.1}))


def test_bad_reward_data_is_named(setup, tmp_path):
    with pytest.raises(DataError, match="'ranked'-shaped but loss 'dpo' reads"):
        PreferenceTrainer(config(setup, tmp_path, data=str(setup / "ranked.json")))
    with pytest.raises(ConfigError, match="shared_prompt needs pairs; data row 1 has 3"):
        PreferenceTrainer(config(setup, tmp_path, loss="reward", packing="shared_prompt",
                                 data=str(setup / "ranked.json")))
    rows = json.loads((setup / "margin.json").read_text())
    del rows[3]["margin"]
    with pytest.raises(DataError, match="39 of 40 rows have a margin.*row 3"):
        PreferenceTrainer(config(setup, tmp_path, loss="reward"), train_data=rows)
    rows[3]["margin"] = "big"
    with pytest.raises(DataError, match="row 3: margin: not a finite number"):
        PreferenceTrainer(config(setup, tmp_path, loss="reward"), train_data=rows)
    bad = [{"prompt": "sort 1 2", "responses": ["1 2"]}]
    with pytest.raises(DataError, match="responses: missing or not a list of >= 2"):
        PreferenceTrainer(config(setup, tmp_path, loss="reward", eval_data=None), train_data=bad)
    with pytest.raises(ConfigError, match=r"option\(s\) \['beta'\] do not apply to loss 'reward'"):
        PreferenceTrainer(config(setup, tmp_path, loss="reward", loss_options={"beta": 0.1}))
    with pytest.raises(ConfigError, match="reference-free"):
        PreferenceTrainer(config(setup, tmp_path, loss="reward", reference="live"))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_train_the_reward_model_as_one(setup, tmp_path, fsdp):
    import yaml
    one = config(setup, tmp_path / "one", loss="reward", max_steps=3, batch_size=2,
                 grad_accum=2, packing="padding_free", data=str(setup / "ranked.json"))
    PreferenceTrainer(one).train()
    two = dict(one, output_dir=str(tmp_path / "two"), grad_accum=1, fsdp=fsdp)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", "-m", "alignkit.cli", "train", str(tmp_path / "two.yaml")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert "score.weight" in a
    assert_weights_close(b, a, one["lr"])
    assert not torch.equal(a["score.weight"], PreferenceTrainer(one).model.score.weight.detach())
