"""metrics.jsonl (one JSON object per logged step; eval records carry "split": "eval"),
TensorBoard when installed, and the reward-curve plot of ``alignkit plot OUTPUT_DIR``."""
from __future__ import annotations

import json
import os
import warnings


class MetricsLog:
    def __init__(self, output_dir: str, tensorboard: bool = True):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                pass

    def truncate_after(self, step: int):
        """On resume: drop records past the checkpoint, which the resumed run writes again."""
        if not os.path.isfile(self.path):
            return
        keep = []
        with open(self.path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ok = rec["step"] <= step
                except (ValueError, KeyError, TypeError):
                    # a write cut short (a kill, a full disk): that record is lost, not the run
                    warnings.warn(f"{self.path}: line {i + 1} is not a complete metrics record "
                                  f"({line[:60].rstrip()!r}); dropped", RuntimeWarning)
                    continue
                if ok:
                    keep.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{split}/{k}", v, record["step"])
            self.tb.flush()


def read_metrics(output_dir: str) -> list:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {output_dir!r} a training output "
                                "directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(output_dir: str, out: str | None = None) -> str:
    """Reward curves (chosen, rejected, margin) and reward accuracy, train and eval -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(output_dir)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("eval", "o--")):
        rows = [r for r in recs if r.get("split", "train") == split]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            if key in rows[0]:
                ax1.plot(steps, [r.get(key) for r in rows], style, label=f"{split} {key[8:]}")
        if "rewards/accuracies" in rows[0]:
            ax2.plot(steps, [r["rewards/accuracies"] for r in rows], style, label=split)
    ax1.set(xlabel="step", ylabel="reward", title="rewards")
    ax2.set(xlabel="step", ylabel="accuracy", title="reward accuracy", ylim=(-0.02, 1.02))
    ax2.axhline(0.5, color="grey", lw=0.8, ls=":")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or os.path.join(output_dir, "rewards.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
