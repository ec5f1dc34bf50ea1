"""The autograd side shared by the single passes (pair_pass, token_pass): the gradients are
formed in forward, held on ctx, and scaled by the upstream scalar in backward (no second [V, H]
buffer)."""
from __future__ import annotations

import torch

_AUTOCAST_KEYS = [getattr(torch._C.DispatchKey, k) for k in dir(torch._C.DispatchKey)
                  if k.startswith("Autocast")]


def eager_autograd():
    """The dispatch state of plain eager code, autocast left as it is, for the loss's gradient
    in _grads. Inside the custom op alignkit::pair_pass (pass_op.py) the kernel runs below
    autograd: its autograd keys (and, in a compiled graph, functorch's) are excluded, and
    autograd.grad would find no graph. Eager calls already run in this state."""
    ex = torch._C._dispatch_tls_local_exclude_set()
    keep = ex - ex
    for k in _AUTOCAST_KEYS:
        if ex.has(k):
            keep = keep | torch._C.DispatchKeySet(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), keep)

def stash(ctx, bufs, form, o, need, hidden, weight, labels, bias, *extra):
    """forward's side of a pass whose gradients it formed: bufs (gh, gw, gb) go back scaled in
    place (no second [V, H] buffer). They are held on ctx, not saved for backward (a saved tensor
    changed in place fails autograd's version check); a second backward (retain_graph=True)
    forms them again from the inputs with form(hidden, weight, labels, bias, *extra, o, *need)."""
    ctx.bufs, ctx.form, ctx.o, ctx.need, ctx.n_extra = bufs, form, o, need, len(extra)
    ctx.save_for_backward(hidden, weight, labels, bias, *extra)


def scaled_grads(ctx, grad_loss):
    """backward's side: the stashed gradients times the upstream scalar, in the inputs' dtypes."""
    hidden, weight, labels, bias, *extra = ctx.saved_tensors
    bufs, ctx.bufs = ctx.bufs, None
    if bufs is None:                  # a second backward: the first scaled them in place
        bufs = ctx.form(hidden.detach(), weight.detach(), labels,
                        bias.detach() if bias is not None else None, *extra, ctx.o,
                        *ctx.need)[-3:]
    scale = grad_loss.to(torch.float32)
    gh, gw, gb = (b.mul_(scale) if b is not None else None for b in bufs)
    return (gh.view(hidden.shape).to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None, None,
            gb.to(bias.dtype) if gb is not None else None) + (None,) * (ctx.n_extra + 1)


def needs(ctx, bias):
    return (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3])
