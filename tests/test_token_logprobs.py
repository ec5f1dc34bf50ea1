"""token_logprobs (logits given) against the float64 oracle, and its memory contract."""
import pytest
import torch

import alignkit
from alignkit.bench.profiling import peak_memory_bytes
from alignkit.testing.oracle import reference_token_logprobs as ref
from conftest import assert_oracle


def _grads(fn, x, y, g1, g2, **kw):
    x = x.detach().clone().requires_grad_()
    lp, ent = fn(x, y, return_entropy=True, **kw)
    (lp * g1.to(lp.dtype) + ent * g2.to(ent.dtype)).sum().backward()
    return lp, ent, x.grad


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 4.0), (torch.bfloat16, 2.0),
                                          (torch.float16, 2.0)])
@pytest.mark.parametrize("kw", [{}, dict(temperature=0.6)])
def test_against_oracle(backend, dtype, factor, kw):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 37, 1000, generator=g, dtype=torch.float64) * 4).to(dtype)
    y = torch.randint(0, 1000, (3, 37), generator=g)
    y[0, :9] = -100
    y[2] = -100
    g1 = torch.randn(3, 37, generator=g, dtype=torch.float64)
    g2 = torch.randn(3, 37, generator=g, dtype=torch.float64)
    ours = _grads(alignkit.token_logprobs, x, y, g1, g2, backend=backend, **kw)
    oracle = _grads(ref, x.double(), y, g1, g2, **kw)
    naive = _grads(ref, x, y, g1, g2, **kw)
    assert ours[2].dtype == dtype and ours[2].shape == x.shape
    assert torch.all(ours[0][y == -100] == 0) and torch.all(ours[2][2] == 0)
    for name, a, o, n in zip(("logprobs", "entropy", "grad_logits"), ours, oracle, naive):
        assert_oracle(name, a, o, n, factor)


def test_large_logits(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 513, generator=g) * 1000
    y = torch.randint(0, 513, (17,), generator=g)
    g1, g2 = torch.randn(17, generator=g).double(), torch.randn(17, generator=g).double()
    ours = _grads(alignkit.token_logprobs, x, y, g1, g2, backend=backend)
    oracle = _grads(ref, x.double(), y, g1, g2)
    naive = _grads(ref, x, y, g1, g2)
    for name, a, o, n in zip(("logprobs", "entropy", "grad_logits"), ours, oracle, naive):
        assert_oracle(name, a, o, n)


def test_non_contiguous_rows(backend):
    # logits[:, :-1] of a [B, T+1, V] buffer: rows have a gap, the op must not copy them all
    g = torch.Generator().manual_seed(2)
    full = torch.randn(2, 11, 300, generator=g)
    x = full[:, :-1]
    y = torch.randint(0, 300, (2, 10), generator=g)
    lp = alignkit.token_logprobs(x, y, backend=backend)
    assert (lp.double() - ref(x.double(), y)).abs().max() < 1e-5


def test_memory_contract(backend, monkeypatch):
    """Forward: no second [N, V] fp32 tensor. Backward: one [N, V] gradient, plus one chunk."""
    monkeypatch.setenv("ALIGNKIT_TILE_BYTES", str(256 * 1024))
    N, V = 512, 4000
    x = torch.randn(N, V, requires_grad=True)
    y = torch.randint(0, V, (N,))
    full = N * V * 4
    fwd_peak = peak_memory_bytes(lambda: alignkit.token_logprobs(x, y, backend=backend))
    assert 0 < fwd_peak < 0.25 * full, fwd_peak
    lp = alignkit.token_logprobs(x, y, backend=backend)
    bwd_peak = peak_memory_bytes(lambda: lp.sum().backward())
    assert full <= bwd_peak < 1.25 * full, bwd_peak
