"""Every bad input raises an error that names the argument and what was expected."""
import pytest
import torch

import alignkit


def _ok(N=4, H=8, V=20):
    return torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))


@pytest.mark.parametrize("label,match", [(20, r"labels must be in \[0, 20\)"),
                                         (-1, r"labels must be in \[0, 20\)")])
def test_label_out_of_range(backend, label, match):
    h, W, y = _ok()
    y[2] = label
    with pytest.raises(ValueError, match=match):
        alignkit.linear_token_logprobs(h, W, y, backend=backend)
    with pytest.raises(ValueError, match=match):
        alignkit.token_logprobs(h @ W.t(), y, backend=backend)


def test_shapes_and_types():
    h, W, y = _ok()
    with pytest.raises(ValueError, match=r"hidden's last dim must equal weight's H=8"):
        alignkit.linear_token_logprobs(torch.randn(4, 9), W, y)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        alignkit.linear_token_logprobs(h, W, y[:3])
    with pytest.raises(ValueError, match=r"weight must be 2-D \[V, H\]"):
        alignkit.linear_token_logprobs(h, W[None], y)
    with pytest.raises(TypeError, match=r"hidden must be a floating tensor"):
        alignkit.linear_token_logprobs(h.long(), W, y)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        alignkit.linear_token_logprobs(h, W, y.float())
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \(20,\)"):
        alignkit.linear_token_logprobs(h, W, y, bias=torch.zeros(19))
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        alignkit.linear_token_logprobs(h, W, y, temperature=0.0)
    with pytest.raises(ValueError, match=r"softcap must be None or a finite number > 0"):
        alignkit.linear_token_logprobs(h, W, y, softcap=-1.0)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        alignkit.linear_token_logprobs(h, W, y, backend="cuda")
    with pytest.raises(ValueError, match=r"labels must have shape \(4, 5\) \(logits.shape\[:-1\]\), got \(4,\)"):
        alignkit.token_logprobs(torch.randn(4, 5, 20), y)
    with pytest.raises(ValueError, match=r"segment_ids must have the shape of labels"):
        alignkit.sequence_logprobs(h, W, y, segment_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"padded input needs hidden \[S, T, H\]"):
        alignkit.sequence_logprobs(h, W, y)


def test_devices():
    h, W, y = _ok()
    with pytest.raises(ValueError, match=r"all inputs must be on one device"):
        alignkit.linear_token_logprobs(h, W.to("meta"), y)


def test_triton_on_cpu_without_interpreter_is_clear(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, W, y = _ok()
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors, or on CPU "
                                         r"tensors under TRITON_INTERPRET=1"):
        alignkit.linear_token_logprobs(h, W, y, backend="triton")
