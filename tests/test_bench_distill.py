"""alignkit bench --loss distill on a tiny shape: alignkit's distill_loss, TRL's chunked
divergence and the naive full logits beside the 4-GEMM floor (Liger's fused JSD is CUDA-only:
skipped with the reason here)."""
import pytest
import torch

from alignkit.bench import cli
from alignkit.ops import distill_pass


def test_alignkit_bench_distill_on_a_tiny_shape():
    before = sum(distill_pass.CALLS.values())
    lines = []
    res = cli.run(["--hidden", "16", "--vocab", "64", "--tokens", "64", "--loss", "distill",
                   "--dtype", "fp32", "--reps", "1", "--no-progress"], log=lines.append)
    names = [r.method for r in res["rows"]]
    assert names[0] == "GEMM floor (4 GEMMs)"
    assert {"alignkit distill_loss", "TRL chunked divergence", "naive full logits"} <= set(names)
    ak = next(r for r in res["rows"] if r.method == "alignkit distill_loss")
    assert ak.seconds > 0 and ak.peak_mib > 0 and ak.x_floor > 0
    assert sum(distill_pass.CALLS.values()) > before          # the rows ran alignkit's pass
    liger = next(r for r in res["rows"] if r.method.startswith("Liger"))
    if not torch.cuda.is_available():
        assert liger.seconds is None and "CUDA" in liger.note
    assert "the four GEMMs" in "\n".join(lines)


def test_bench_distill_refuses_options_it_cannot_serve():
    with pytest.raises(SystemExit):
        cli.run(["--hidden", "16", "--vocab", "64", "--tokens", "64", "--loss", "distill",
                 "--backend", "cpp", "--no-progress"])
