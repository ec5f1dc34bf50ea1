"""The vocab-parallel head (issue 37): per-rank memory, communication and time of one fused
log-prob step (forward + backward) on an LM head split over the vocabulary across p ranks
(processes on this machine, gloo), against gathering the head first.

    python -m bench.vocab_parallel [--ranks 1 2 4] [--V 32000] [--H 512] [--N 1024] [--reps 3]

Per p, rank 0's numbers (the ranks are symmetric):
- ``sharded``: alignkit.linear_token_logprobs on the rank's shard W_r [V/p, H] with
  TileOptions(vocab_group=...) (alignkit/ops/vocab_parallel.py);
- ``gather``: all_gather the shards into W [V, H], the same op on the whole head, each rank
  keeping its rows of grad_W (gather-then-compute; Megatron's without a vocab-parallel loss).
Columns: peak = the exact peak of live memory inside the step beyond its inputs
(alignkit.bench.profiling.peak_memory_bytes: the profiler's [memory] events summed in time order;
W_r, hidden and labels are inputs), against the target (grad_W + W)/p + grad_h + the tile
budget; bytes forward / backward = the collectives' payloads (alignkit.bench.profiling.CollectiveLog);
time = the median step. Time on a 2-core machine shared by p processes says little: the memory
and the bytes are the targets. Liger's LigerVocabParallelCrossEntropy is not compared: it takes
the logits' shard [N, V/p] (a cross-entropy on given logits), not the head.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_main(a):
    import torch
    import torch.distributed as dist

    import alignkit
    from alignkit.bench.profiling import CollectiveLog, peak_memory_bytes
    dist.init_process_group("gloo", init_method=f"file://{a.store}", rank=a.rank,
                            world_size=a.world, timeout=timedelta(seconds=300))
    p, r, V, H, N = a.world, a.rank, a.V, a.H, a.N
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, H, generator=g) * 0.05
    h = torch.randn(N, H, generator=g).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    sizes = [len(x) for x in torch.tensor_split(torch.arange(V), p)]
    start = sum(sizes[:r])
    w = W[start:start + sizes[r]].clone().requires_grad_()
    del W
    tile = alignkit.TileOptions().resolved(head=(sizes[r], H)).tile_bytes
    tiles = alignkit.TileOptions(vocab_group=dist.group.WORLD)

    def sharded():
        alignkit.linear_token_logprobs(h, w, y, tiles=tiles).sum().backward()

    def gather():
        # gloo gathers equal blocks: each shard padded to the longest
        mine = torch.zeros(sizes[0], H)
        mine[:sizes[r]] = w.detach()
        parts = [torch.empty(sizes[0], H) for _ in sizes]
        dist.all_gather(parts, mine)
        full = torch.cat([x[:n] for x, n in zip(parts, sizes)]).requires_grad_()
        del parts, mine
        alignkit.linear_token_logprobs(h, full, y).sum().backward()
        w.grad = full.grad[start:start + sizes[r]].clone()

    out = {}
    for name, step in (("sharded", sharded), ("gather", gather)):
        step()                                       # warm-up (the layout exchange, caches)
        h.grad = w.grad = None
        peak = peak_memory_bytes(step)
        h.grad = w.grad = None
        with CollectiveLog() as c:
            step()
        h.grad = w.grad = None
        times = []
        for _ in range(a.reps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            h.grad = w.grad = None
        out[name] = dict(peak=peak, bytes=c.bytes, collectives=c.log,
                         time=statistics.median(times))
    out["target"] = 2 * sizes[r] * H * 4 + N * H * 4 + tile
    out["whole_grad_w"] = V * H * 4
    if r == 0:
        with open(a.out, "w") as f:
            json.dump(out, f)
    dist.barrier()                  # no rank tears its group down while another still talks
    dist.destroy_process_group()


def run(world, V, H, N, reps, timeout=600):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        procs = [subprocess.Popen(
            [sys.executable, "-m", "bench.vocab_parallel", "--rank", str(r), "--world", str(world),
             "--store", os.path.join(d, "store"), "--out", out, "--V", str(V), "--H", str(H),
             "--N", str(N), "--reps", str(reps)], env=env, stderr=subprocess.PIPE, text=True,
            cwd=ROOT)
            for r in range(world)]
        for q in procs:
            try:
                _, err = q.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for x in procs:
                    x.kill()
                raise RuntimeError(f"a rank of world {world} hung")
            if q.returncode:
                raise RuntimeError(f"a rank of world {world} failed:\n{err[-3000:]}")
        with open(out) as f:
            return json.load(f)


def table(results, V, H, N) -> str:
    mib = 1 / 2**20
    lines = [f"V={V} H={H} N={N} tokens, fp32, one forward + backward; rank 0",
             "", "| p | plan | peak MiB | target MiB | fwd+bwd bytes | B/token | time s |",
             "|---|---|---|---|---|---|---|"]
    for p, res in results.items():
        for name in ("sharded", "gather"):
            x = res[name]
            lines.append(f"| {p} | {name} | {x['peak'] * mib:.2f} | {res['target'] * mib:.2f} | "
                         f"{x['bytes']} | {x['bytes'] / N:.0f} | {x['time']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--H", type=int, default=512)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rank is not None:
        return rank_main(a)
    results = {p: run(p, a.V, a.H, a.N, a.reps) for p in a.ranks}
    print(table(results, a.V, a.H, a.N))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
    if "--rank" in sys.argv:
        # a rank's result is written: it ends here. The interpreter's own teardown once aborted a
        # finished rank ("terminate called without an active exception": a thread destroyed
        # still joinable, in a fresh-clone CI run on the AVX2 EPYC, 2026-12-08), which failed the
        # bench after its work was done
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
