"""The drop-in under 2-rank gloo: DDP syncs the gradients, FSDP2 gathers and reduce-scatters the
head, and a head sharded by a ZeRO-3-like stand-in is gathered through the head's own call. Each
must give the gradients of one process on the whole batch."""
import pytest
import torch

pytest.importorskip("transformers")

from dist_dropin_worker import one_process_grads  # noqa: E402
from ranks import run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def single():
    return one_process_grads()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "sharded_head"])
def test_two_ranks_match_one_process(single, tmp_path, mode):
    out = tmp_path / "grads.pt"
    run_ranks("dist_dropin_worker.py", [mode, out], world=2)
    got = torch.load(out)
    assert set(got) == set(single)
    for n, g in single.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
