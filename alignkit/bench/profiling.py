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


class CollectiveLog:
    """Counts torch.distributed's collectives and their bytes while open:
    ``with CollectiveLog() as c: ...`` -> c.log, [(name, bytes)] in call order, bytes the largest
    tensor or tensor list (summed: an all_gather's output) of the call: the payload one rank
    hands in or gets back.
    It patches the module's functions, so it sees calls made as ``dist.all_reduce(...)``."""
    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
             "reduce", "send", "recv")

    def __init__(self):
        self.log, self._real = [], {}

    def __enter__(self):
        import torch
        import torch.distributed as dist
        for n in self.NAMES:
            real = getattr(dist, n)
            self._real[n] = real

            def wrapped(*a, _n=n, _real=real, **k):
                args = list(a) + list(k.values())
                one = [x.numel() * x.element_size() for x in args if isinstance(x, torch.Tensor)]
                lists = [sum(t.numel() * t.element_size() for t in x if isinstance(t, torch.Tensor))
                         for x in args if isinstance(x, (list, tuple))]
                self.log.append((_n, max(one + lists, default=0)))
                return _real(*a, **k)
            setattr(dist, n, wrapped)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        for n, real in self._real.items():
            setattr(dist, n, real)
        return False

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.log)
