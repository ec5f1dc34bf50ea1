"""patch_trainer on TRL 1.16's SFTTrainer: a tiny random Llama, a locally trained tokenizer and
prompt-completion rows of ../shared/data/dpo_en_demo.json; the unpatched trainer is the
reference, step by step (loss, entropy, mean_token_accuracy, grad norm). Plain NLL and DFT go
through TRL's fused-head call; label smoothing, where TRL runs a full-logits forward, through
alignkit.sft_loss."""
import pytest

trl = pytest.importorskip("trl")

from test_integrations_trl import compare, pair_rows, run  # noqa: E402,F401


@pytest.fixture(scope="module")
def sft_rows(pair_rows):  # noqa: F811
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows[:8]]


@pytest.mark.parametrize("cfg, op", [
    (dict(), "linear_logprobs_stats"),
    (dict(loss_type="dft"), "linear_logprobs_stats"),
    (dict(label_smoothing_factor=0.1), "sft_loss_tokens"),
], ids=["nll", "dft", "label_smoothing"])
def test_sft_trainer_patched_matches_unpatched(tok, sft_rows, tmp_path, op_calls, cfg, op):
    a = run(trl.SFTTrainer, trl.SFTConfig, tok, sft_rows, tmp_path, False, calls=op_calls, **cfg)
    b = run(trl.SFTTrainer, trl.SFTConfig, tok, sft_rows, tmp_path, True, calls=op_calls, **cfg)
    assert op_calls.count(op) >= 3                  # the op under test answered every step
    assert {"entropy", "mean_token_accuracy"} <= set(a[0])
    compare(a, b)
