"""Validation shared by the losses: each error names the argument and the expected range."""
from __future__ import annotations

import math

import torch


def check_beta(beta):
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_label_smoothing(eps):
    if not (isinstance(eps, (int, float)) and 0 <= eps < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps!r}")


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
