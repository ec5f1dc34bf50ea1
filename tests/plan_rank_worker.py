"""One gloo rank of test_plan's rank tests (spawned by tests/ranks.py). Each rank sees its own
batch length.

  slow     each rank makes a different candidate slow on purpose (rank 0 the recompute, rank 1
           the single pass): left to themselves they would choose differently; the chooser
           broadcasts rank 0's choice.
  diverge  rank 1's own batch fits only the recompute (its single passes' peaks are inflated), rank
           0's fits every plan: the ranks see different feasible plans, and must still make the
           same collectives (a rank-local shortcut before a broadcast would hang them).
Second argument: "tune" (autotune) or "model" (the cost model). Writes {rank: [plans...]}."""
import json
import sys

import torch
import torch.distributed as dist

import alignkit
from alignkit.ops import plan
from ranks import COLLECTIVE_TIMEOUT


def main(mode, how, out):
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    rank = dist.get_rank()
    if mode == "slow":
        real = plan.time_candidate
        slow = "recompute" if rank == 0 else "single_pass"

        def patched(c, *a):
            result, dt = real(c, *a)
            return result, dt + (1.0 if c.name == slow else 0.0)
        plan.time_candidate = patched
    elif mode == "diverge" and rank == 1:
        real_budgets = plan.budgets

        def over(*a, **k):            # the single passes' peaks past any cap on this rank
            return {n: (peak * (1 if n == "recompute" else 1000), *rest)
                    for n, (peak, *rest) in real_budgets(*a, **k).items()}
        plan.budgets = over
    g = torch.Generator().manual_seed(rank)
    T = 40 + 13 * rank
    h = torch.randn(4, T, 32, generator=g).requires_grad_()
    W = torch.randn(1000, 32, generator=g).requires_grad_()
    y = torch.randint(0, 1000, (4, T), generator=g)
    seen = []
    for _ in range(2 * plan.ROUNDS + 2):
        loss, _ = alignkit.preference_loss(h, W, y, loss="simpo",
                                           tiles=alignkit.TileOptions(autotune=how == "tune"))
        loss.backward()
        seen.append([plan.LAST[0].plan, plan.LAST[0].how])
        dist.all_reduce(torch.ones(1))            # the training step's own collective
    with open(f"{out}.{rank}", "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
