"""The head's front doors under torch.autocast: the inputs are cast to the autocast dtype as
F.linear's would be, so the call equals the same call on bf16 copies (same path, same GEMMs), and
the gradients reach the fp32 leaves in fp32.

Before the cast (alignkit.ops.backends.autocast_head), an fp32 head under bf16 autocast ran in
fp32 (on a GPU: fp32 dots on the CUDA cores), so these comparisons differed by bf16's rounding of
the inputs, and the single passes raised (index_copy_ of bf16 GEMM output into fp32 buffers).
"""
import pytest
import torch

import alignkit
from test_policy import _inputs as policy_inputs
from test_single_pass import pair_inputs


def _leaves(*ts, dtype=torch.float32):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in ts]


def _same(call, tensors, dtype=torch.bfloat16):
    """call(*tensors) under cpu autocast(dtype) on fp32 leaves, and call on `dtype` leaves
    without autocast: outputs equal, gradients equal and fp32 on the fp32 leaves."""
    f32 = _leaves(*tensors)
    low = _leaves(*tensors, dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        got = call(*f32)
    want = call(*low)
    got.backward()
    want.backward()
    assert torch.equal(got.detach().float(), want.detach().float()), (got, want)
    for a, b in zip(f32, low):
        if a is None:
            continue
        assert a.grad.dtype == torch.float32
        assert torch.equal(a.grad, b.grad.float())
    # and the cast did something: the fp32 call outside autocast differs
    plain = call(*_leaves(*tensors))
    assert not torch.equal(plain.detach().float(), want.detach().float())


def test_linear_token_logprobs_under_autocast():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(3, 11, 48, generator=g), torch.randn(700, 48, generator=g) * 0.3
    b = torch.randn(700, generator=g)
    y = torch.randint(0, 700, (3, 11), generator=g)
    y[0, :4] = -100
    w = torch.randn(3, 11, generator=g)

    def call(h, W, b):
        lp = alignkit.linear_token_logprobs(h, W, y, bias=b)
        assert lp.dtype == torch.float32
        return (lp * w).sum()
    _same(call, (h, W, b))


@pytest.mark.parametrize("grad_mode", ["auto", "recompute"])
def test_preference_loss_under_autocast(grad_mode):
    h, W, b, y, _ = pair_inputs(T=19, H=32, V=400, bias=True, pairs=2)
    ref = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 20

    def call(h, W, b):
        return alignkit.preference_loss(h, W, y, bias=b, loss="dpo", ref_logprobs=ref.float(),
                                        grad_mode=grad_mode)[0]
    _same(call, (h, W, b))

    def simpo(h, W):
        return alignkit.preference_loss(h, W, y, loss="simpo", grad_mode=grad_mode)[0]
    _same(simpo, (h, W))


def test_preference_loss_reference_model_is_cast_too():
    h, W, _, y, _ = pair_inputs(T=13, H=16, V=300)
    rh, rW = h + 0.1, W * 0.9

    def call(h, W, rh, rW):
        return alignkit.preference_loss(h, W, y, loss="dpo", ref_hidden=rh.detach(),
                                        ref_weight=rW.detach())[0]
    f32 = _leaves(h, W, rh, rW)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call(*f32)
    assert got.item() == call(*_leaves(h, W, rh, rW, dtype=torch.bfloat16)).item()


@pytest.mark.parametrize("grad_mode", ["single_pass", "recompute"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_under_autocast(level, grad_mode):
    h, W, b, y, g = policy_inputs(S=4, Tn=11, H=24, V=500)
    adv = torch.randn(4, generator=g)
    old = torch.randn(y.shape, generator=g) * 0.1 - 5

    def call(h, W, b):
        return alignkit.policy_loss(h, W, y, bias=b, advantages=adv, old_logprobs=old,
                                    loss_type="grpo", importance_sampling_level=level,
                                    grad_mode=grad_mode)[0]
    _same(call, (h, W, b))


def test_float64_and_no_autocast_are_left_alone():
    from alignkit.ops.backends import autocast_head
    seen = []

    @autocast_head
    def door(hidden, weight, *, bias=None, other=None):
        seen.append((hidden.dtype, weight.dtype, bias.dtype, other.dtype,
                     torch.is_autocast_enabled("cpu")))
    x32, x64 = torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64)
    door(x32, x32, bias=x32, other=x32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        door(x32, x64, bias=x32, other=x32)
    assert seen == [(torch.float32,) * 4 + (False,),
                    (torch.bfloat16, torch.float64, torch.bfloat16, torch.float32, False)]
