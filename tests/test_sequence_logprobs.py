"""sequence_logprobs: padded and packed layouts, sums and averages, empty sequences."""
import torch

import alignkit
from alignkit.testing.oracle import reference_sequence_logprobs
from conftest import make_inputs


def test_padded_matches_reference(backend):
    h, W, b, y = make_inputs((4, 23), 31, 700, bias=True, seed=1)
    y[3] = -100  # fully masked sequence: value 0, count 0, no NaN
    for average in (False, True):
        v, c = alignkit.sequence_logprobs(h, W, y, bias=b, average=average, backend=backend)
        rv, rc = reference_sequence_logprobs(h.detach().double(), W.detach().double(), y,
                                             bias=b.detach().double(), average=average)
        assert v.shape == (4,) and c.dtype == torch.long
        assert torch.equal(c, rc)
        assert (v.double() - rv).abs().max() < 1e-4
        assert v[3] == 0.0 and c[3] == 0


def test_packed_equals_padded(backend):
    h, W, _, y = make_inputs((3, 19), 24, 500, seed=2)
    lengths = [19, 11, 7]
    packed_h = torch.cat([h[i, :n] for i, n in enumerate(lengths)])
    packed_y = torch.cat([y[i, :n] for i, n in enumerate(lengths)])
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    y_pad = y.clone()
    for i, n in enumerate(lengths):
        y_pad[i, n:] = -100
    for average in (False, True):
        pv, pc = alignkit.sequence_logprobs(packed_h, W, packed_y, segment_ids=seg,
                                            average=average, backend=backend)
        dv, dc = alignkit.sequence_logprobs(h, W, y_pad, average=average, backend=backend)
        assert torch.equal(pc, dc)
        assert torch.allclose(pv, dv, rtol=1e-5, atol=1e-5)
    # gradients agree too
    gp = torch.autograd.grad(alignkit.sequence_logprobs(packed_h, W, packed_y, segment_ids=seg)[0].sum(), W)[0]
    gd = torch.autograd.grad(alignkit.sequence_logprobs(h, W, y_pad)[0].sum(), W)[0]
    assert torch.allclose(gp, gd, rtol=1e-4, atol=1e-6)


def test_num_segments_keeps_trailing_empty_segments():
    h, W, _, y = make_inputs((6,), 8, 30, ignore_frac=0.0, seed=3)
    seg = torch.tensor([0, 0, 1, 1, 1, 1])
    v, c = alignkit.sequence_logprobs(h, W, y, segment_ids=seg, num_segments=4, average=True)
    assert v.shape == (4,) and c.tolist() == [2, 4, 0, 0] and torch.all(v[2:] == 0)
    assert torch.isfinite(v).all()
