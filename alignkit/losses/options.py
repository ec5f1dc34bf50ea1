"""Validation shared by the losses: each error names the argument and the expected range."""
from __future__ import annotations

import torch

from alignkit.ops.options import is_real


def check_number(name, v, *, low=None, high=None, low_open=False, high_open=False):
    """v is a real number (not a bool), finite, and inside the given bounds."""
    ok = is_real(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        if low is not None and high is not None:
            what = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            what = f"a finite number {'>' if low_open else '>='} {low}"
        elif high is not None:
            what = f"a finite number {'<' if high_open else '<='} {high}"
        else:
            what = "a finite number"
        raise ValueError(f"{name} must be {what}, got {v!r}")


def check_beta(beta):
    check_number("beta", beta, low=0, low_open=True)


def check_label_smoothing(eps):
    check_number("label_smoothing", eps, low=0, high=0.5, high_open=True)


def check_pair_tensors(**tensors):
    """All 1-D, same length, on one device."""
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [B], got shape {tuple(t.shape)}")
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(f"{name} must have the shape of {first} {tuple(shape)}, "
                             f"got {tuple(t.shape)}")
