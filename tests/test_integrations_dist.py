"""The drop-in under 2-rank gloo: DDP syncs the gradients, FSDP2 gathers and reduce-scatters the
head, and a head sharded by a ZeRO-3-like stand-in is gathered through the head's own call. Each
must give the gradients of one process on the whole batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from dist_dropin_worker import pairs, tiny  # noqa: E402

from alignkit.integrations.hf import fused_preference_loss, pack_pairs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single():
    model = tiny()
    # each rank's loss is the mean over its 2 pairs; the ranks' gradients are averaged
    grads = {}
    for r in range(2):
        model.zero_grad()
        loss, _ = fused_preference_loss(model, pack_pairs(pairs()[r::2], packing="padding_free"),
                                        loss="simpo", beta=2.0, gamma=0.5)
        loss.backward()
        for n, p in model.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad / 2
    return grads


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "sharded_head"])
def test_two_ranks_match_one_process(single, tmp_path, mode):
    out = tmp_path / "grads.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_port()), os.path.join(HERE, "dist_dropin_worker.py"),
                        mode, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    got = torch.load(out)
    assert set(got) == set(single)
    for n, g in single.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
