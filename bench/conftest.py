"""The pytest-benchmark suite's cases: every (shape, loss) x every method of
alignkit.bench.methods.steps_for (the floor, alignkit, each peer), grouped by shape and loss.

    pytest bench --benchmark-only                       # the suite's shapes, timed
    pytest bench --benchmark-disable                    # tiny shapes, each case run once
    make bench-compare                                  # the suite against bench/baselines/

With --benchmark-disable (the smoke run of ``make test``) the shapes are tiny and nothing is
measured beyond one run of each case.
"""
from __future__ import annotations

import pytest

SUITE = [("S1 2x256 H256 V8000", 2, 256, 256, 8000),
         ("M1 4x512 H512 V32000", 4, 512, 512, 32000)]
TINY = [("tiny 2x16 H16 V64", 2, 16, 16, 64)]
LOSSES = ("logprobs", "dpo", "dapo")


def _names(loss):
    """The method names of a loss's set (built on a throwaway case) and the skipped peers."""
    from alignkit.bench import methods
    case = methods.make_case("names", 2, 8, 8, 16)
    steps, skipped = methods.steps_for(case, loss)
    return list(steps) + list(skipped)


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    tiny = metafunc.config.getoption("benchmark_disable", False)
    params, ids = [], []
    for shape in (TINY if tiny else SUITE):
        for loss in LOSSES:
            for m in _names(loss):
                params.append((shape, loss, m))
                ids.append(f"{shape[0].split()[0]}-{loss}-{m}")
    metafunc.parametrize("bench_case", params, ids=ids)


@pytest.fixture(scope="session")
def cases():
    """One set of inputs per shape, and one steps_for per (shape, loss), shared by the tests."""
    store = {}

    def get(shape, loss):
        from alignkit.bench import methods
        if shape not in store:
            store[shape] = (methods.make_case(*shape), {})
        case, by_loss = store[shape]
        if loss not in by_loss:
            by_loss[loss] = methods.steps_for(case, loss)
        return case, by_loss[loss]
    return get
