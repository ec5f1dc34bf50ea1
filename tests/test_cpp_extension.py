"""The compiled CPU backend: built, picked by "auto", and independent of the thread count."""
import os

import pytest
import torch

import alignkit
from alignkit.ops.backends import resolve
from conftest import make_inputs


def test_extension_built_and_auto_picks_it():
    if not alignkit.cpp_available():
        if os.environ.get("ALIGNKIT_REQUIRE_CPP") == "1":
            pytest.fail("alignkit._C was not built, but CI requires it (ALIGNKIT_REQUIRE_CPP=1)")
        pytest.skip("alignkit._C not built here")
    assert resolve("auto", torch.device("cpu")) == "cpp"
    from alignkit import _C
    assert _C.isa() in ("avx512", "avx2", "scalar")


@pytest.mark.skipif(not alignkit.cpp_available(), reason="alignkit._C not built")
def test_thread_count_independent():
    h, W, b, y = make_inputs((4, 50), 40, 3000, bias=True, seed=21)
    outs = []
    old = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            h.grad = W.grad = b.grad = None
            lp, ent = alignkit.linear_token_logprobs(h, W, y, bias=b, return_entropy=True,
                                                     backend="cpp")
            (lp.sum() + ent.sum()).backward()
            outs.append((lp.detach(), ent.detach(), h.grad.clone(), W.grad.clone()))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        # the kernels' per-row work is identical for any split; only MKL's GEMM may reorder sums
        for a, b_ in zip(outs[0], o):
            assert torch.allclose(a, b_, rtol=1e-5, atol=1e-6)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    import warnings

    from alignkit.ops import backends
    monkeypatch.setattr(backends, "_cpp", None)
    monkeypatch.setattr(backends, "_CPP_ERROR", ImportError("simulated"))
    monkeypatch.setattr(backends, "_warned", False)
    h, W, _, y = make_inputs((3, 5), 8, 40, seed=22)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = alignkit.linear_token_logprobs(h, W, y)
        b = alignkit.linear_token_logprobs(h, W, y)
    msgs = [str(w.message) for w in caught if "alignkit._C" in str(w.message)]
    assert len(msgs) == 1 and "torch backend" in msgs[0]
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"backend='cpp' requested but alignkit._C is not built"):
        alignkit.linear_token_logprobs(h, W, y, backend="cpp")
