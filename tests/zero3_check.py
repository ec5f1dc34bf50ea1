"""DeepSpeed ZeRO-3 check of the drop-in (not collected by pytest: DeepSpeed is not a dev
dependency, its default isolated build would pull a CUDA torch). Run it where DeepSpeed is
installed, e.g. on these CPU machines:

    DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed hjson py-cpuinfo msgpack ninja einops
    python -m torch.distributed.run --nproc_per_node 2 tests/zero3_check.py

Each rank scores its half of the pairs through ``fused_preference_loss`` on the ZeRO-3 engine
(``lm_head.weight`` is an empty partition outside its module's call); the full gradients
(``safe_get_full_grad``) must equal one process's average over the two halves.
"""
import os
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_dropin_worker import one_process_grads, pairs, tiny  # noqa: E402

from alignkit.integrations.hf import fused_preference_loss, pack_pairs  # noqa: E402


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    want = one_process_grads()
    model = tiny()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    assert engine.module.lm_head.weight.numel() == 0, "ZeRO-3 did not partition the head"
    batch = pack_pairs(pairs()[rank::2], packing="padding_free")
    loss, _ = fused_preference_loss(engine, batch, loss="simpo", beta=2.0, gamma=0.5)
    engine.backward(loss)
    worst = 0.0
    for n, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
        worst = max(worst, (g - want[n]).abs().max().item())
    if rank == 0:
        print(f"ZeRO-3: {len(want)} parameters' gradients match one process "
              f"(max abs diff {worst:.2e})")


if __name__ == "__main__":
    main()
