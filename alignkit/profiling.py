"""Exact peak of live tensor memory on CPU (RSS is far too coarse for this).

Sums the profiler's `[memory]` allocation events (`nbytes()`, negative for frees) in time order
and takes the running maximum. Tensors alive before `fn` runs are not counted.
"""
from __future__ import annotations

import gc

from torch.profiler import ProfilerActivity, profile


def peak_memory_bytes(fn) -> int:
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak
