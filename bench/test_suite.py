"""One pytest-benchmark case per (shape, loss, method): the time of one fwd+bwd from fresh grads
(pytest-benchmark's statistics), and in extra_info the ratio to the GEMM floor (the median of
back-to-back (floor, method) pairs, which keeps out the machine's drift) and the exact peak
memory. The regression gate (alignkit.bench.compare) reads the alignkit cases' ratios."""
import pytest

from alignkit.bench import harness

PAIRS = 7


def test_case(benchmark, bench_case, cases):
    shape, loss, method = bench_case
    name = shape[0]
    case, (steps, skipped) = cases(shape, loss)
    if method in skipped:
        pytest.skip(skipped[method])
    step = steps[method]
    if not method.startswith("alignkit") and method != harness.FLOOR:
        try:                          # a peer that breaks is reported as such, not as our failure
            case.reset()
            step()
        except Exception as e:            # noqa: BLE001 (torch.compile raises anything)
            pytest.xfail(f"peer failed: {type(e).__name__}: {e}"[:200])
    benchmark.group = f"{name} {loss}"
    benchmark.name = method
    disabled = benchmark.disabled
    if not disabled:
        info = dict(shape=name, loss=loss, method=method, alignkit=method.startswith("alignkit"))
        if method != harness.FLOOR:
            ratio, _ = harness.paired_ratios({harness.FLOOR: steps[harness.FLOOR], method: step},
                                             harness.FLOOR, warmup=1, reps=PAIRS,
                                             reset=case.reset)
            case.reset()
            peak = harness.peak_bytes(step)
            info.update(x_floor=ratio[method], peak_mib=peak / 2**20,
                        x_memory_floor=peak / 2**20 / case.grads_mib)
        benchmark.extra_info.update(info)
    benchmark.pedantic(step, setup=case.reset, rounds=1 if disabled else 3, iterations=1,
                       warmup_rounds=0 if disabled else 1)
