"""Exact peak of live tensor memory on CPU (RSS is far too coarse for this).

Sums the profiler's `[memory]` allocation events (`nbytes()`, negative for frees) in time order
and takes the running maximum. Tensors alive before `fn` runs are not counted.
"""
from __future__ import annotations

import gc
import os

from torch.profiler import ProfilerActivity, profile

# kineto prints two "USDT ... profiler_start/stop" lines to stderr per window; read at the first
# window, so set here unless the user set it
os.environ.setdefault("KINETO_LOG_LEVEL", "99")


def peak_memory_bytes(fn) -> int:
    w = MemoryWindow()
    w.start()
    try:
        fn()
    finally:
        peak = w.stop()
    return peak


class MemoryWindow:
    """The same peak over a window opened and closed by callbacks (e.g. one training step):
    ``w.start()`` ... ``w.stop()`` -> peak bytes allocated in between."""

    def __init__(self):
        self.prof, self.peak = None, None

    def start(self):
        gc.collect()
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def stop(self) -> int:
        self.prof.__exit__(None, None, None)
        events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
        self.peak, self.prof = peak, None
        return peak


def resident_bytes(modules=(), optimizer=None) -> int:
    """Bytes held by the modules' parameters and gradients and the optimizer's state, each
    storage counted once (a tied weight, a parameter shared by two modules)."""
    import torch
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel():
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            add(p)
            add(p.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                add(v)
    return total
