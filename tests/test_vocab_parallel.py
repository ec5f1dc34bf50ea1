"""The vocab-parallel head (alignkit/ops/vocab_parallel.py, issue 37) on 2 and 3 gloo ranks:
every rank runs tests/vocab_parallel_worker.py, which checks each op and loss on its shard
against the whole head in one process (fp32, 1e-5 relative: loss, outputs, grad_h, grad_W and
grad_b as shards), for a plain shard with vocab_group and for a DTensor Shard(0) head; V = 203
gives uneven shards at both sizes. Here: every rank finished every case, the path ran, the
collectives and their bytes, and the per-rank peak memory. At 2 ranks also the HF drop-in on a
transformers model with a DTensor lm_head, which must never call full_tensor()."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _spawn(tmp_path, world):
    d = tmp_path / f"world{world}"
    d.mkdir()
    store, out = str(d / "store"), str(d / "out")
    env = dict(os.environ, OMP_NUM_THREADS="1", ALIGNKIT_PLAN_CACHE=str(d / "plans.json"),
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "vocab_parallel_worker.py"),
                               str(r), str(world), store, f"{out}.{r}"], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    return procs, out


def _wait(procs, out, world):
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank hung (world {world})")
        errs.append((p.returncode, err))
    for rc, err in errs:
        assert rc == 0, err[-4000:]
    return [json.load(open(f"{out}.{r}")) for r in range(world)]


def _run(tmp_path, *worlds):
    """Every world's ranks at once (the machine's cores overlap their start-up)."""
    started = {w: _spawn(tmp_path, w) for w in worlds}
    return {w: _wait(*started[w], w) for w in worlds}


def test_vocab_parallel_matches_one_process(tmp_path):
    for world, res in _run(tmp_path, 2, 3).items():
        for r in res:
            _check(r, world)


def _check(r, world):
    # the HF drop-in on a hand-sharded lm_head runs at 2 ranks only (transformers' import)
    assert r["cases"] == ["plain", "dtensor", "dtensor2d", "plain-start", "refusals"] + (
        ["dropin"] if world == 2 else [])
    assert r["calls"] >= 20                      # the sharded op ran, case after case
    c = r["comm"]
    n, tokens, H = c["labelled"], c["tokens"], c["H"]
    # forward: one MAX of [M] fp32 and one SUM of [M, 2] (+1 column with entropy)
    assert c["fwd_plain"] == [["all_reduce", 4 * n], ["all_reduce", 8 * n]]
    assert c["fwd"] == [["all_reduce", 4 * n], ["all_reduce", 12 * n]]
    assert sum(b for _, b in c["fwd_plain"]) <= 12 * n
    assert sum(b for _, b in c["fwd"]) <= 16 * n
    # backward: grad_h, N x H x 4 bytes, once per op call; nothing V-sized anywhere
    assert c["bwd"] == [["all_reduce", tokens * H * 4]] * 2
    assert all(b < c["V"] * 4 or b == tokens * H * 4
               for _, b in c["fwd"] + c["fwd_plain"] + c["bwd"])
    m = r["mem"]
    assert m["peak"] <= m["target"] and m["peak"] <= m["engine"], m
    assert m["peak"] < m["whole_grad_w"] / world * 1.5, m     # a shard's, not the whole's


@pytest.mark.slow
def test_a_dp_by_vocab_mesh_with_fsdp2_on_the_body(tmp_path):
    """4 ranks, a (dp=2, tp=2) mesh: FSDP2 shards the body over dp, the head is split over the
    vocabulary on tp; losses and gradients equal one process on both batches
    (vocab_parallel_worker.fsdp2d)."""
    for r in _run(tmp_path, 4)[4]:
        assert r["cases"] == ["fsdp2d"] and r["calls"] >= 1


def test_the_vocab_options_are_checked_by_name():
    import alignkit
    with pytest.raises(TypeError, match="vocab_group"):
        alignkit.TileOptions(vocab_group="tp")
    with pytest.raises(ValueError, match="vocab_group too"):
        alignkit.TileOptions(vocab_start=3)
    with pytest.raises(ValueError, match="vocab_start"):
        alignkit.TileOptions(vocab_start=-1)


def test_bench_vocab_parallel_smoke():
    """bench.vocab_parallel at 2 ranks on a tiny head: the sharded step's bytes are O(tokens)
    and below gather-then-compute's, its peak within the target."""
    from bench.vocab_parallel import main
    N, H, V = 40, 16, 301
    res = main(["--ranks", "2", "--V", str(V), "--H", str(H), "--N", str(N), "--reps", "1"])[2]
    s, g = res["sharded"], res["gather"]
    assert s["bytes"] <= 16 * N + N * H * 4 and all(b < V * H * 2 for _, b in s["collectives"])
    assert g["bytes"] >= V * H * 4 > s["bytes"]
    assert s["peak"] <= res["target"] and s["peak"] < g["peak"]
