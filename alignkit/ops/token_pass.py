"""The token pass: a token-level loss L = Σ_t f_t(lp_t, H_t) with its gradient formed in forward
from full-vocabulary tiles (alignkit/ops/vocab_tiles.py), 3 GEMMs per token; policy_loss's single
pass (alignkit/losses/policy.py states the per-token terms).

Shapes: hidden [N, H], weight [V, H], labels [N]; lp and ent [N].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.ops.options import LogprobArgs
from alignkit.ops.pass_autograd import needs, scaled_grads, stash
from alignkit.ops.validate import labelled_rows
from alignkit.ops.vocab_tiles import VocabTiles


@dataclass(frozen=True)
class TokenPassSpec:
    """What one token-pass call runs, built per call by the front door (policy_loss, sft_loss)
    from the loss's math and the chosen plan's TileOptions; not an options object.
    A token-level loss L = Σ_t f_t(lp_t, H_t): each token's coefficients are known as soon as
    its row is scored, so every tile is formed once (3 GEMMs for any number of sequences).
    coef: (token indices, lp, ent) -> (dL/dlp, dL/dH or None) of a tile's rows; finish: (lp [N],
    ent [N] or None) -> the loss (0-dim); entropy: fold the entropy statistics.

    coupled: a loss whose dL/dlp_t is known only once every token is scored (sequence-level
    importance sampling: w_s = mean of lp − old over s), with no gradient through the entropy.
    coef is not read: dL/dlp comes from finish by autograd at the end. The first `keep` tokens
    (keep_rows) are formed once with a unit coefficient and their G kept until then (3 GEMMs);
    the others are scored first and formed again (4 GEMMs).

    sums: each token's lse = log Σ_v exp z_v and zsum = Σ_v z_v too (VocabTiles' sums: label
    smoothing and z-loss, sft_loss); coef then takes (ic, lp, ent, lse, zsum) and returns
    (dL/dlp, dL/dH, dL/dlse, dL/dzsum), finish takes (lp, ent, stats) with stats =
    {"lse", "zsum", "top1"} [N] each, and token_pass_loss returns stats [N, 3] (lse, zsum,
    top1 as 0/1) as a fourth output. Not with coupled. zsum=False: Σ_v z_v is not formed (reads
    0; the loss has no smoothing)."""
    coef: object
    finish: object
    logprob: LogprobArgs
    rows: int
    vocab_block: int = 2048
    entropy: bool = False
    coupled: bool = False
    keep: int = 0
    sums: bool = False
    zsum: bool = True

    def __post_init__(self):
        if self.sums and self.coupled:
            raise ValueError("TokenPassSpec: sums with a coupled loss is not served (a kept G "
                             "carries one scale per row; the sums' terms are two more)")


def _token_grads(hidden, weight, labels, bias, o: TokenPassSpec, need_h, need_w, need_b):
    y = labels.reshape(-1)
    # the label range check and the labelled tokens: one host read (labelled_rows)
    idx = labelled_rows(y, weight.shape[0], o.logprob.ignore_index)
    need = need_h or need_w or need_b
    M = idx.numel()
    n_keep = min(o.keep, M) if o.coupled and need else 0
    tiles = VocabTiles(hidden, weight, labels, bias, idx, o.logprob, o.rows, o.vocab_block, need_h,
                   need_w, need_b, entropy=o.entropy, keep=n_keep, sums=o.sums, zsum=o.zsum)
    sel = torch.arange(M, device=hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)

    def full(x):                                  # labelled-token values -> [N]
        return torch.zeros(y.numel(), **f32).index_copy_(0, idx, x) if x is not None else None
    if not o.coupled:
        lp, ent = tiles.sweep(sel, o.coef if need else None)
        if o.sums:
            lse, zsum, top1 = (full(x.float()) for x in tiles.sums_out)
            stats = dict(lse=lse, zsum=zsum, top1=top1)
            return (o.finish(full(lp), full(ent), stats), full(lp), full(ent),
                    torch.stack([lse, zsum, top1], 1), tiles.gh, tiles.gw, tiles.gb)
        return (o.finish(full(lp), full(ent)), full(lp), full(ent), None, tiles.gh, tiles.gw,
                tiles.gb)
    # coupled: the tokens past the keep budget scored first (forward only), the kept ones
    # formed with a unit coefficient; then dL/dlp of every token from the loss, by autograd
    k_sel, r_sel = sel[:n_keep], sel[n_keep:]
    lp_r, ent_r = tiles.sweep(r_sel)
    lp_k, ent_k = tiles.sweep(k_sel, torch.ones(n_keep, **f32), keep=True)
    lp_all = full(torch.cat([lp_k, lp_r]))
    ent_all = full(torch.cat([ent_k, ent_r])) if o.entropy else None
    with torch.enable_grad():
        x = lp_all.clone().requires_grad_()
        loss = o.finish(x, ent_all)
        g = torch.autograd.grad(loss, x, allow_unused=True)[0] if need else None
    if g is not None:
        g = g.index_select(0, idx)
        if n_keep:
            tiles.finish_kept(k_sel, g[:n_keep])
        if r_sel.numel():
            tiles.sweep(r_sel, g[n_keep:].contiguous())
    return loss.detach(), lp_all, ent_all, None, tiles.gh, tiles.gw, tiles.gb


class _TokenPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, o: TokenPassSpec):
        need = needs(ctx, bias)
        loss, lp, ent, stats, gh, gw, gb = _token_grads(hidden, weight, labels, bias, o, *need)
        stash(ctx, (gh, gw, gb), _token_grads, o, need, hidden, weight, labels, bias)
        for x in (lp, ent, stats):
            if x is not None:
                ctx.mark_non_differentiable(x)
        return loss.detach(), lp, ent, stats

    @staticmethod
    def backward(ctx, grad_loss, _glp, _gent, _gstats):
        return scaled_grads(ctx, grad_loss)


def token_pass_loss(hidden, weight, labels, bias, o: TokenPassSpec):
    """(loss, lp [N], ent [N] or None) of a token-level loss, its gradient w.r.t. hidden, weight
    and bias formed in the forward pass (see TokenPassSpec). The caller validated the inputs;
    the label range is checked in _token_grads, before any tile is formed (in the pass's one
    host read). With o.sums, (loss, lp, ent, stats [N, 3]): see TokenPassSpec."""
    loss, lp, ent, stats = _TokenPass.apply(hidden, weight, labels.long(), bias, o)
    return (loss, lp, ent, stats) if o.sums else (loss, lp, ent)
