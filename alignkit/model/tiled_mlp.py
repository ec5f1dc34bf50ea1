"""Tiled MLP: a decoder layer's MLP run a chunk of tokens at a time, recomputed per chunk in
backward, so its [tokens × intermediate] activations never exist whole (Snowflake's Arctic Long
Sequence Training, "TiledMLP", arXiv:2506.13996).

A gated MLP (Llama, Qwen2, Gemma) over T tokens saves gate, up and act(gate)·up, 3·T·I floats, for
backward: 516 MiB per layer at T=65536, I=688 in fp32, about as much as the layer's other
activations together. Tiled, forward keeps only its input [T, H] and the output; backward
recomputes one chunk of Tc tokens at a time under autograd and frees it, so the MLP's transient
peak is ~4·Tc·I floats.
The MLP is per token, so tiling is exact: the same sums, per chunk.

``tile_mlp(model, chunk_tokens=None)`` replaces every decoder layer's ``mlp`` by a ``TiledMLP``
that holds the same children under the same names: state dicts, checkpoints and optimizers see the
same parameters. The parameters enter the autograd function as inputs and their gradients leave
it as outputs (summed over chunks), so DDP's and FSDP2's gradient hooks fire as for the plain
MLP. Autocast is replayed in backward as it was in forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

# Chunk: max(H, 1024) tokens. ALST's rule (ceil(T / H) shards) makes a chunk's [Tc, I]
# intermediate the size of one MLP weight [H, I]; the 1024 floor keeps the GEMMs efficient on a CPU
# for small H. Measured on the bench model (H=256, I=688) at 16384 tokens with checkpointing: one
# 24k-token chunk saved nothing (the MLP's ~10.7 H floats per token were all live in the recompute).
MIN_CHUNK = 1024


def chunk_tokens_for(hidden: int) -> int:
    return max(MIN_CHUNK, int(hidden))


class _TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp, names, chunk, x, *params):
        dev = x.device.type
        ctx.mlp, ctx.names, ctx.chunk = mlp, names, chunk
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, *params)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([mlp(c) for c in flat.split(chunk)])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        dev, enabled, dtype = ctx.autocast
        flat, gflat = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        want = [p.requires_grad for p in params]
        gx = torch.empty_like(flat) if ctx.needs_input_grad[3] else None
        gp = [None] * len(params)
        start = 0
        for xc, gc in zip(flat.split(ctx.chunk), gflat.split(ctx.chunk)):
            xc = xc.detach().requires_grad_(gx is not None)
            leaves = [p.detach().requires_grad_(w) for p, w in zip(params, want)]
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                out = functional_call(ctx.mlp, dict(zip(ctx.names, leaves)), (xc,))
            inputs = ([xc] if gx is not None else []) + [p for p in leaves if p.requires_grad]
            got = list(torch.autograd.grad(out, inputs, gc, allow_unused=True))
            if gx is not None:
                gx[start:start + len(xc)] = got.pop(0)
            for i, w in enumerate(want):
                if w:
                    g = got.pop(0)
                    if g is not None:
                        gp[i] = g if gp[i] is None else gp[i].add_(g)
            start += len(xc)
        return (None, None, None, None if gx is None else gx.view_as(x), *gp)


class TiledMLP(nn.Module):
    """The MLP ``mlp`` run ``chunk_tokens`` tokens at a time (module docstring). Same children,
    same parameter names as ``mlp``; ``.inner`` is the original module."""

    def __init__(self, mlp: nn.Module, chunk_tokens: int):
        super().__init__()
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive integer; got {chunk_tokens!r}")
        object.__setattr__(self, "inner", mlp)         # not a child: no "inner." in the names
        for name, child in mlp.named_children():
            self.add_module(name, child)
        for name, p in mlp.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.chunk_tokens = chunk_tokens

    def forward(self, x: Tensor) -> Tensor:
        named = list(self.inner.named_parameters())
        names, params = tuple(n for n, _ in named), [p for _, p in named]
        return _TiledMLPFunction.apply(self.inner, names, self.chunk_tokens, x, *params)


def _layers(model):
    """The decoder's layers: the first ModuleList named ``layers`` whose entries have an .mlp."""
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and \
                all(isinstance(getattr(layer, "mlp", None), nn.Module) for layer in layers):
            return layers
    raise ValueError(f"{type(model).__name__}: tiled_mlp needs decoder layers with an .mlp "
                     "module (Llama, Qwen2, Gemma and their kin)")


def tile_mlp(model: nn.Module, chunk_tokens: Optional[int] = None) -> nn.Module:
    """Every decoder layer's MLP tiled (in place; idempotent). chunk_tokens: tokens per chunk
    (default ``chunk_tokens_for(config.hidden_size)``). Returns the model."""
    if chunk_tokens is None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        chunk_tokens = chunk_tokens_for(hidden if isinstance(hidden, int) else MIN_CHUNK)
    for layer in _layers(model):
        if not isinstance(layer.mlp, TiledMLP):
            layer.mlp = TiledMLP(layer.mlp, chunk_tokens)
    return model


def untile_mlp(model: nn.Module) -> nn.Module:
    """The original MLPs back (in place). Returns the model."""
    for layer in _layers(model):
        if isinstance(layer.mlp, TiledMLP):
            layer.mlp = layer.mlp.inner
    return model


__all__ = ["TiledMLP", "tile_mlp", "untile_mlp", "chunk_tokens_for"]
