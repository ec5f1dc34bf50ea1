"""The plan chooser (alignkit/ops/plan.py): measured on the calls' own inputs and cached on disk,
the cost model without timing, pinned plans, rank 0's choice under torch.distributed, and the
memory options' bounds (exact peaks)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import alignkit
from alignkit.ops import plan
from ranks import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    """Each test measures into a plan cache of its own: a timed decision must not reach the
    session's cache, which the other tests read."""
    monkeypatch.setenv("ALIGNKIT_PLAN_CACHE", str(tmp_path / "plans"))


def _pair(S=4, T=48, H=32, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, T, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    y = torch.randint(0, V, (S, T), generator=g)
    y[:, :5] = -100
    return h, W, y


def _step(h, W, y, **kw):
    h.grad = W.grad = None
    loss, _ = alignkit.preference_loss(h, W, y, **kw)
    loss.backward()
    return loss.detach(), h.grad.clone(), W.grad.clone()


TUNED = alignkit.TileOptions(autotune=True)


def _steady(monkeypatch, per_plan=None):
    """time_candidate runs the candidate but reports a fixed time per plan: the rounds agree
    (tiny shapes on a shared machine time too noisily to test the order on)."""
    real = plan.time_candidate
    per_plan = per_plan or {"recompute": 2.0, "single_pass": 1.0, "single_pass_fast": 1.0}

    def steady(c, *a):
        out, _ = real(c, *a)
        return out, per_plan[c.name]
    monkeypatch.setattr(plan, "time_candidate", steady)


def test_a_new_key_is_measured_then_cached_then_read_by_another_process(tmp_path, monkeypatch):
    _steady(monkeypatch)
    h, W, y = _pair()
    runs = []
    n = 2 * plan.ROUNDS
    for _ in range(n + 1):
        _step(h, W, y, loss="simpo", tiles=TUNED)
        runs.append((plan.LAST[0].plan, plan.LAST[0].how))
    # two candidates in interleaved rounds (A B, B A, ...), then the cached winner
    order = ["recompute", "single_pass"] + ["single_pass", "recompute"] * (plan.ROUNDS - 1)
    assert [r[0] for r in runs[:n]] == order
    assert [r[1] for r in runs] == ["tuning"] * (n - 1) + ["measured", "cache"]
    with open(plan.cache_path()) as f:
        cached = json.load(f)
    (rec,) = cached.values()           # the plan, with the times it was decided by
    assert rec["plan"] == runs[-1][0] == "single_pass"
    assert rec["ratio"] == {"recompute": 1.0, "single_pass": 0.5}
    assert rec["ns_per_token"]["recompute"] == pytest.approx(2 * rec["ns_per_token"]["single_pass"])
    code = ("from test_plan import _pair, _step, TUNED; from alignkit.ops import plan\n"
            "h, W, y = _pair(); _step(h, W, y, loss='simpo', tiles=TUNED); "
            "print(plan.LAST[0].how, plan.LAST[0].plan)\n"
            "h, W, y = _pair(T=300); _step(h, W, y, loss='simpo', tiles=TUNED); "
            "print(plan.LAST[0].how)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = p.stdout.split("\n")[:2]
    assert first == f"disk {runs[-1][0]}"            # the second process reads the winner
    assert second == "tuning"                       # another token bucket tunes afresh


def test_the_chooser_picks_the_faster_candidate(monkeypatch, tmp_path):
    real = plan.time_candidate
    for slow, want in (("single_pass", "recompute"), ("recompute", "single_pass")):
        plan.forget()
        monkeypatch.setenv("ALIGNKIT_PLAN_CACHE", str(tmp_path / slow))
        monkeypatch.setattr(plan, "time_candidate", real)
        _steady(monkeypatch, {"recompute": 1.0, "single_pass": 1.0, slow: 1.5})
        h, W, y = _pair()
        for _ in range(2 * plan.ROUNDS + 1):
            _step(h, W, y, loss="simpo", tiles=TUNED)
        assert (plan.LAST[0].how, plan.LAST[0].plan) == ("cache", want)


def test_rounds_that_disagree_get_one_more_round_and_are_not_cached_on_disk(monkeypatch):
    """Each round alone must pick the winner (after the first, a warm-up): where the rounds
    disagree (the candidates too close to call, or another process took the cores) one more
    round runs; still disagreeing, the choice holds in this process but is not written to disk,
    so the next process measures again instead of reading a disturbed decision for good."""
    real = plan.time_candidate
    seen = []

    def jumpy(c, *a):
        out, _ = real(c, *a)
        seen.append(c.name)
        k = seen.count(c.name) - 1                   # this candidate's k-th run: its round
        return out, (1.0 if c.name == "recompute" else [0.5, 2.0][k % 2])
    monkeypatch.setattr(plan, "time_candidate", jumpy)
    h, W, y = _pair()
    runs = []
    n = 2 * plan.ROUNDS + 2                          # the rounds, and one more of each
    for _ in range(n + 1):
        _step(h, W, y, loss="simpo", tiles=TUNED)
        runs.append(plan.LAST[0].how)
    assert runs == ["tuning"] * (n - 1) + ["measured", "cache"]
    assert len(seen) == n
    assert not os.path.exists(plan.cache_path()) or not any(
        "|pair:" in k for k in json.load(open(plan.cache_path())))
    plan.forget()                                     # a new process: it measures again
    _step(h, W, y, loss="simpo", tiles=TUNED)
    assert plan.LAST[0].how == "tuning"


def test_a_close_call_takes_the_least_memory_plan_for_this_process_only(monkeypatch):
    """The single pass at 0.99 of the recompute's time in every round: within the margin, so the
    recompute (less memory) serves, but a close call is not written to disk: one process's
    phase of the machine should not settle it for every later process."""
    _steady(monkeypatch, {"recompute": 1.0, "single_pass": 0.99})
    h, W, y = _pair()
    for _ in range(2 * plan.ROUNDS + 3):
        _step(h, W, y, loss="simpo", tiles=TUNED)
    assert (plan.LAST[0].how, plan.LAST[0].plan) == ("cache", "recompute")
    assert not os.path.exists(plan.cache_path()) or not any(
        "|pair:" in k for k in json.load(open(plan.cache_path())))


def test_a_round_is_scored_against_its_own_first_candidate(monkeypatch):
    """The machine slows down after the first call (drift): each round's times are compared
    within the round, so the candidate that is faster in every round wins; the fastest run of
    each over the whole tuning would pick the other (its one run in the fast round)."""
    real = plan.time_candidate
    seen = []

    def drifting(c, *a):
        out, _ = real(c, *a)
        seen.append(c.name)
        speed = 1.0 if len(seen) == 1 else 3.0        # the first call fast, the rest slow
        return out, speed * (1.0 if c.name == "recompute" else 0.8)
    monkeypatch.setattr(plan, "time_candidate", drifting)
    h, W, y = _pair()
    for _ in range(2 * plan.ROUNDS + 1):
        _step(h, W, y, loss="simpo", tiles=TUNED)
    assert (plan.LAST[0].how, plan.LAST[0].plan) == ("cache", "single_pass")


def test_the_bench_measures_afresh_over_a_cached_plan(monkeypatch):
    """alignkit bench (without --cached-plans) reads no decided plan from disk: a plan cached by
    an earlier process, measured under other load, is measured again."""
    from alignkit.ops import plan_store
    _steady(monkeypatch)
    h, W, y = _pair()
    for _ in range(2 * plan.ROUNDS + 1):
        _step(h, W, y, loss="simpo", tiles=TUNED)
    key = plan.LAST[0].key
    plan._write_disk({plan._skey(key): plan_store.plan_record("recompute", {}, {})})
    plan.forget()
    _step(h, W, y, loss="simpo", tiles=TUNED)
    assert (plan.LAST[0].how, plan.LAST[0].plan) == ("disk", "recompute")
    plan.forget()
    monkeypatch.setattr(plan_store, "_READ_PLANS", [False])
    for _ in range(2 * plan.ROUNDS + 1):
        _step(h, W, y, loss="simpo", tiles=TUNED)
    assert (plan.LAST[0].how, plan.LAST[0].plan) == ("cache", "single_pass")
    assert json.load(open(plan.cache_path()))[plan._skey(key)]["plan"] == "single_pass"


def test_autotune_off_times_no_candidate(monkeypatch):
    timed = []
    monkeypatch.setattr(plan, "time_candidate", lambda *a: timed.append(a) or None)
    h, W, y = _pair()
    for _ in range(3):
        _step(h, W, y, loss="simpo")                # autotune=False here (conftest)
    assert timed == [] and plan.LAST[0].how in ("model", "cache")


def test_tuning_calls_give_the_pinned_plans_results():
    """A tuning call runs one candidate (the recompute with its gradient formed in forward):
    loss and gradients are that plan's, bit for bit, as when it is pinned."""
    h, W, y = _pair(seed=3)
    tuned = [_step(h, W, y, loss="dpo", ref_logprobs=torch.zeros(4), tiles=TUNED)
             for _ in range(2)]
    for got, name in zip(tuned, ("recompute", "single_pass")):
        want = _step(h, W, y, loss="dpo", ref_logprobs=torch.zeros(4),
                     tiles=alignkit.TileOptions(plan=name))
        for a, b in zip(got, want):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["recompute", "single_pass", "single_pass_fast"])
def test_a_pinned_plan_is_bit_identical_across_runs(name):
    h, W, y = _pair(seed=4)
    kw = dict(loss="orpo", tiles=alignkit.TileOptions(plan=name, memory="fast"))
    a, b = _step(h, W, y, **kw), _step(h, W, y, **kw)
    assert plan.LAST[0].how == "pinned" and plan.LAST[0].plan == name
    for x, z in zip(a, b):
        assert torch.equal(x, z)


def test_pinned_plans_and_memory_are_refused_by_name():
    h, W, y = _pair(4, 160, 256, 8000)
    with pytest.raises(ValueError, match="plan 'single_pass' needs .* over memory='min'"):
        _step(h, W, y, loss="simpo", tiles=alignkit.TileOptions(plan="single_pass", memory="min"))
    with pytest.raises(ValueError, match="memory=1024 allows"):
        _step(h, W, y, loss="simpo", tiles=alignkit.TileOptions(memory=1024))
    with pytest.raises(ValueError, match="contradicts plan='recompute'"):
        _step(h, W, y, loss="simpo", grad_mode="single_pass",
              tiles=alignkit.TileOptions(plan="recompute"))
    with pytest.raises(ValueError, match="memory must be one of"):
        alignkit.TileOptions(memory="huge")
    with pytest.raises(ValueError, match="plan must be None or one of"):
        alignkit.TileOptions(plan="fastest")


@pytest.mark.parametrize("memory", ["min", "bound", "fast", 40 << 20])
def test_every_memory_option_holds_its_bound(memory):
    """Each plan a memory option lets the chooser take, pinned, peaks within the option's cap
    (exact peak: the profiler's memory events). A 64-row tile: the default keep budget holds
    part of the 480 deferred tokens, so the fast plan (all of them kept) is a plan of its own."""
    from alignkit.bench.profiling import peak_memory_bytes
    S, T, H, V = 4, 160, 256, 8000
    h, W, y = _pair(S, T, H, V, seed=5)
    opts = dict(memory=memory, single_pass_bytes=64 * V * 4)
    _step(h, W, y, loss="cpo", tiles=alignkit.TileOptions(**opts))
    feasible = plan.LAST[0].feasible
    assert feasible[0] == "recompute"
    if memory in ("min", "bound", "fast"):
        assert ("single_pass_fast" in feasible) == (memory == "fast")
    t = alignkit.TileOptions(**opts).resolved(head=(V, H))
    cands = plan.candidates(W, h, S * T, "cpp" if alignkit.cpp_available() else "torch", t,
                            None, lambda tt: None, S * T)
    tile = max(c.tile for c in cands if c.name != "single_pass_fast")
    cap = plan.limit(memory, V, H, S * T, tile, recompute_tile=cands[0].tile)
    for name in feasible:
        kw = dict(loss="cpo", tiles=alignkit.TileOptions(**opts, plan=name))

        def step():
            h.grad = W.grad = None
            alignkit.preference_loss(h, W, y, **kw)[0].backward()
        peak = peak_memory_bytes(step)
        assert peak <= cap, (name, memory, peak, cap)


def test_two_gloo_ranks_take_rank_0s_plan(tmp_path):
    out = str(tmp_path / "plans")
    run_ranks("plan_rank_worker.py", ["slow", "tune", out], world=2)
    seen = [json.load(open(f"{out}.{r}")) for r in range(2)]
    assert seen[0] == seen[1]                         # the same plan on every call, both ranks
    assert seen[0][2 * plan.ROUNDS - 1][1] == "measured"
    assert seen[0][-1] == ["single_pass", "cache"]    # rank 0 made the recompute slow


@pytest.mark.parametrize("how", ["tune", "model"])
def test_ranks_whose_batches_fit_different_plans_do_not_wait_on_each_other(tmp_path, how):
    """Rank 1's batch fits only the recompute, rank 0's every plan: before the choice was made
    collectively, rank 1 took its only plan without joining rank 0's broadcast, and both hung
    (the CI run of 699d23e timed out in the DDP drop-in test)."""
    out = str(tmp_path / "plans")
    run_ranks("plan_rank_worker.py", ["diverge", how, out], world=2, timeout=180)
    seen = [json.load(open(f"{out}.{r}")) for r in range(2)]
    assert all(p == "recompute" for p, _ in seen[1]), seen  # its only feasible plan
    assert len({p for p, _ in seen[0]}) >= (2 if how == "tune" else 1)
    if how == "tune":                                 # both ranks finished tuning on one call
        n = 2 * plan.ROUNDS - 1
        assert seen[0][n][1] == seen[1][n][1] == "measured"


def test_a_malformed_or_hostile_plan_cache_is_ignored(tmp_path):
    """The cache is JSON read with json.load: a pickle, a truncated file or an unknown plan name
    in it runs nothing and is ignored (the key is measured afresh)."""
    import pickle
    path = plan.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, W, y = _pair()
    for blob in (pickle.dumps({"x": 1}), b'{"truncated', json.dumps([1, 2]).encode()):
        plan.forget()
        with open(path, "wb") as f:
            f.write(blob)
        _step(h, W, y, loss="simpo", tiles=TUNED)
        assert plan.LAST[0].how == "tuning"
    plan.forget()
    key = plan.plan_key("pair:tied", W.device, W.dtype, "cpp" if alignkit.cpp_available() else
                        "torch", *W.shape, h.shape[0] * h.shape[1], 4, "bound")
    with open(path, "w") as f:
        json.dump({plan._skey(key): "os.system('touch x')"}, f)
    _step(h, W, y, loss="simpo", tiles=TUNED)
    assert plan.LAST[0].how == "tuning"


def test_environment_variables_are_read_in_one_place():
    """Every ALIGNKIT_* variable is read through alignkit/ops/env.py, which documents it."""
    import re
    from alignkit.ops import env
    root = os.path.join(os.path.dirname(HERE), "alignkit")
    named = set()
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py") or f == "env.py":
                continue
            text = open(os.path.join(d, f)).read()
            assert not re.search(r"(os\.environ|getenv)[^\n]*ALIGNKIT_", text), f
            named |= set(re.findall(r"\benv(?:_int|_flag)?\(\"(ALIGNKIT_[A-Z_]+)\"", text))
    assert named <= set(env.VARIABLES), named - set(env.VARIABLES)
    doc = env.__doc__
    assert all(v in doc for v in env.VARIABLES)
    with pytest.raises(KeyError, match="not one of alignkit's documented variables"):
        env.env("ALIGNKIT_NOPE")
