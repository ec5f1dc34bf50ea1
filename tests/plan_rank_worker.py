"""One gloo rank of test_plan.test_two_gloo_ranks_take_rank_0s_plan (run as a script, rank and
world in the environment). Each rank sees its own batch length, and each makes a different
candidate slow on purpose: rank 0 the recompute, rank 1 the single pass. Left to themselves they
would choose differently; the chooser broadcasts rank 0's choice. Writes {rank: [plans...]}."""
import json
import sys

import torch
import torch.distributed as dist

import alignkit
from alignkit.ops import plan


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    real = plan.time_candidate
    slow = "recompute" if rank == 0 else "single_pass"

    def patched(c, *a):
        result, dt = real(c, *a)
        return result, dt + (1.0 if c.name == slow else 0.0)
    plan.time_candidate = patched
    g = torch.Generator().manual_seed(rank)
    T = 40 + 13 * rank
    h = torch.randn(4, T, 32, generator=g).requires_grad_()
    W = torch.randn(1000, 32, generator=g).requires_grad_()
    y = torch.randint(0, 1000, (4, T), generator=g)
    seen = []
    for _ in range(2 * plan.ROUNDS + 2):
        loss, _ = alignkit.preference_loss(h, W, y, loss="simpo",
                                           tiles=alignkit.TileOptions(autotune=True))
        loss.backward()
        seen.append([plan.LAST[0].plan, plan.LAST[0].how])
    with open(f"{out}.{rank}", "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
