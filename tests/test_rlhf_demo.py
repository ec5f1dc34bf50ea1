"""examples/rlhf_demo.py end to end, as a user runs it (InstructGPT's three stages on the demo
task): the reward model reaches >= 0.9 held-out accuracy, and PPO raises the mean reward of fresh
samples over its 50 steps, on the training prompts and on held-out ones."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rlhf_demo_runs_its_three_stages(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, os.path.join(REPO, "examples", "rlhf_demo.py"), "--out",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[3/3] PPO: 50 steps" in p.stdout
    s = json.loads((tmp_path / "rlhf_summary.json").read_text())
    assert s["rm_accuracy"] >= 0.9
    assert len(s["history"]) == 50
    assert s["score_last"] > s["score_first"] + 0.5
    assert s["held_out_after"] > s["held_out_before"]
    for d in ("sft", "rm"):
        assert (tmp_path / d / "final" / "model.safetensors").is_file()
