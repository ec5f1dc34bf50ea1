"""Supervised fine-tuning's token loss from hidden states, on the fused head (no [N, V] logits).

Per labelled token t (label y, z = c·tanh(x/c)/T the transformed logits of x = h·Wᵀ + b, with the
soft cap c optional, lse = log Σ_v exp z_v, lp = z_y − lse, V the vocabulary size):
    ce_t = (1 − ε)·(−lp) + ε·(lse − (1/V)·Σ_v z_v)
           label smoothing ε as torch's F.cross_entropy defines it: the target is (1 − ε)·onehot +
           ε/V·1, so ε·mean_v(−log p_v) joins the NLL (Szegedy et al. 2016, arXiv:1512.00567)
    dft:   ce_t ← sg(exp(lp))·ce_t   (Dynamic Fine-Tuning, Wu et al. 2025, arXiv:2508.05629;
           TRL 1.16 SFTTrainer's loss_type="dft": −lp·sg(p_y))
    ℓ_t = w_t·(ce_t + z·lse²)        (z-loss, PaLM, Chowdhery et al. 2022, arXiv:2204.02311;
           Liger's lse_square_scale); w_t = token_weights (1 without)
    loss = Σ_t ℓ_t / n,  n = the labelled-token count, or num_items (TRL's num_items_in_batch)
Metrics (TRL's SFTTrainer keys): ``entropy`` = mean over labelled tokens of H_t = −Σ_v p_v log p_v;
``mean_token_accuracy`` = the fraction of labelled tokens whose label is the argmax of z.

The fused pass (alignkit.ops.token_pass, sums=True): each token's coefficients
    dL/dlp = −(1 − ε)·s·a,  dL/dlse = (ε·s + 2z·lse)·a,  dL/dΣz = −ε·s·a/V  (a = w_t/n,
    s = sg(p_y) under dft, else 1)
are known as soon as its row is scored, so every tile is formed once: 3 GEMMs (logits, G·W, Gᵀ·h)
with or without smoothing and z-loss; Σ_v z_v is one more per-row sum beside lse (no GEMM;
alignkit/ops/vocab_tiles.py). The recompute plan (tiles.plan="recompute", memory="min",
torch.compile) is the engine's generic op (4 GEMMs), lse and Σ_v z_v beside it from h·W_y and
h·Σ_v W_v; float64, and smoothing under a soft cap, take row chunks of logits in torch under
activation checkpointing (4 GEMMs).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from alignkit.losses.options import check_number
from alignkit.ops.backends import autocast_head, resolve
from alignkit.ops.linear_logprobs import linear_logprobs_stats
from alignkit.ops.options import LogprobArgs, TileOptions
from alignkit.ops.pass_budget import NO_GRAD, effective_mode, pass_blocker, pinned_plan, tile_rows
from alignkit.ops.plan import candidates, choose_and_run, note, plan_key
from alignkit.ops.token_pass import TokenPassSpec, token_pass_loss
from alignkit.ops.validate import check_label_range, check_linear_inputs

SFT_LOSS_TYPES = ("nll", "dft")


def sft_terms(lp: Tensor, lse: Tensor, zsum: Tensor, *, vocab: int, label_smoothing: float = 0.0,
              z_loss: float = 0.0, loss_type: str = "nll") -> Tensor:
    """ℓ_t / w_t per token (module docstring) from its lp, lse and zsum = Σ_v z_v, any shape and
    dtype; the math of sft_loss in one place (the fused pass, the torch chunks and the oracle)."""
    ce = -lp
    if label_smoothing:
        ce = (1 - label_smoothing) * ce + label_smoothing * (lse - zsum / vocab)
    if loss_type == "dft":
        ce = ce * lp.detach().exp()
    if z_loss:
        ce = ce + z_loss * lse * lse
    return ce


def sft_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
             ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
             token_weights: Optional[Tensor] = None, loss_type: str = "nll",
             num_items: Optional[Tensor | int] = None, temperature: float = 1.0,
             softcap: Optional[float] = None, tiles: Optional[TileOptions] = None,
             backend: str = "auto"):
    """Cross-entropy of the labels from hidden states through the LM head (formulas: module
    docstring), with label smoothing, z-loss, per-token weights and TRL's DFT.

    Shapes: hidden [..., H], weight [V, H], labels [...] (label i scored from hidden i;
    ignore_index marks prompt and padding), bias [V], token_weights the labels' shape.
    num_items: the divisor (TRL's num_items_in_batch: the labelled tokens of the accumulation
    window); default the labelled tokens here. temperature, softcap: z = softcap·tanh(x/softcap)
    / temperature, as the rest of alignkit. tiles: alignkit.TileOptions (memory, plan, autotune,
    budgets); backend: "auto", "cpp", "torch" or "triton" (the engine's).

    Returns (loss, metrics): a 0-dim loss, differentiable w.r.t. hidden, weight and bias;
    metrics {"entropy", "mean_token_accuracy"}, 0-dim detached tensors (fp32; fp64 for fp64
    inputs)."""
    loss, metrics, _, _ = sft_loss_tokens(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, token_weights=token_weights,
        loss_type=loss_type, num_items=num_items, temperature=temperature, softcap=softcap,
        tiles=tiles, backend=backend)
    return loss, metrics


@autocast_head
def sft_loss_tokens(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
             ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
             token_weights: Optional[Tensor] = None, loss_type: str = "nll",
             num_items: Optional[Tensor | int] = None, temperature: float = 1.0,
             softcap: Optional[float] = None, tiles: Optional[TileOptions] = None,
             backend: str = "auto"):
    """sft_loss, and its per-token metrics for drop-ins that log them per token (TRL's
    SFTTrainer): (loss, metrics, entropy [N], top1 [N] bool), N = labels.numel(), 0 / False at
    ignored tokens, detached."""
    loss, metrics = _sft(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss,
                         token_weights, loss_type, num_items, temperature, softcap, tiles,
                         backend)
    metrics = dict(metrics)
    ent, top1 = metrics.pop("_tokens")
    return loss, metrics, ent, top1.bool()


def _sft(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, token_weights,
         loss_type, num_items, temperature, softcap, tiles, backend):
    check_linear_inputs(hidden, weight, labels, bias)
    check_number("label_smoothing", label_smoothing, low=0, high=1)
    check_number("z_loss", z_loss, low=0)
    if loss_type not in SFT_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(SFT_LOSS_TYPES)}, got {loss_type!r}")
    if tiles is not None and not isinstance(tiles, TileOptions):
        raise TypeError(f"tiles must be an alignkit.TileOptions, got {tiles!r}")
    lp_opts = LogprobArgs(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                             backend=backend, tiles=tiles or TileOptions(), return_entropy=True)
    V, H = weight.shape
    flat, y = hidden.reshape(-1, H), labels.reshape(-1).long()
    mask = y != ignore_index
    a = _token_scale(token_weights, labels, mask, num_items,
                     torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    terms = dict(vocab=V, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                 loss_type=loss_type)
    tiles = tiles or TileOptions()
    mode = effective_mode("auto", tiles)
    why = pass_blocker(flat, weight, bias, "auto")
    compiling = torch.compiler.is_compiling()

    def recompute(h, w, b):
        if h.dtype != torch.float64 and not (softcap is not None and label_smoothing):
            return _engine_recompute(h, w, b, y, mask, a, lp_opts, terms)
        if not compiling:            # the pass checks the range in its one host read
            check_label_range(y, V, ignore_index)
        return _torch_chunks(h, w, b, y, mask, a, lp_opts, terms, tiles)

    def run_pass(tt):
        po = TokenPassSpec(_coefficients(a, terms), lambda lp, ent, st: _finish(lp, st, a, terms),
                              LogprobArgs(ignore_index=ignore_index, temperature=temperature,
                                             softcap=softcap, backend=backend, tiles=tt),
                              _rows(V, H, weight, tt, backend, softcap, label_smoothing),
                              tt.resolved().vocab_block, entropy=True, sums=True,
                              zsum=bool(label_smoothing))

        def run(h, w, b):
            loss, _, ent, stats = token_pass_loss(h, w, y, b, po)
            return loss, _metrics(ent, stats[:, 2], mask)
        return run

    # float64 (the pass's kernels are fp32/bf16) and torch.compile (no timing, no host read in
    # the graph) take the recompute; so does a plan pinned to "recompute"
    if compiling or mode == "recompute" or (why is not None and why != NO_GRAD):
        note("recompute", "pinned" if mode == "recompute" else why or "torch.compile")
        return recompute(flat, weight, bias)
    if why is not None:             # no gradient wanted: the pass's forward, 1 GEMM a tile
        note("single_pass", why)
        return run_pass(tiles)(flat, weight, bias)
    t = tiles.resolved(head=(V, H))
    rows = flat.shape[0]
    be = resolve(backend, weight.device)
    cands = candidates(weight, flat, rows, be, t, recompute, run_pass, 0)
    key = plan_key("sft", weight.device, weight.dtype, be, V, H, rows, 1, t.memory)
    return choose_and_run(key, cands, t, flat, weight, bias, rows, pinned_plan(mode, t),
                          tiles.memory_given())


def _token_scale(token_weights, labels, mask, num_items, dtype) -> Tensor:
    """a_t = w_t·[labelled]/n [N] in dtype: the weight of each token's term in the loss."""
    m = mask.to(dtype)
    if token_weights is not None:
        if not isinstance(token_weights, Tensor) or \
                tuple(token_weights.shape) != tuple(labels.shape):
            shape = tuple(token_weights.shape) if isinstance(token_weights, Tensor) else \
                type(token_weights).__name__
            raise ValueError(f"token_weights must be per token, the labels' shape "
                             f"{tuple(labels.shape)}; got {shape}")
        if not token_weights.dtype.is_floating_point:
            raise TypeError(f"token_weights must be a float tensor, got {token_weights.dtype}")
        if token_weights.device != labels.device:
            raise ValueError(f"token_weights is on {token_weights.device}, labels on "
                             f"{labels.device}")
        m = m * token_weights.detach().reshape(-1).to(dtype)
    if num_items is None:
        n = mask.sum()
    else:
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a number or a 1-element tensor, got shape "
                                 f"{tuple(num_items.shape)}")
        else:
            check_number("num_items", num_items, low=0)
        n = torch.as_tensor(num_items, device=mask.device).reshape(())
    # clamped so that a batch without labelled tokens gives a finite zero (TRL's rule)
    return m / n.to(dtype).clamp(min=1)


def _coefficients(a, terms):
    """The pass's per-row coefficients (dL/dlp, dL/dH, dL/dlse, dL/dΣz) of the tile's tokens ic
    (module docstring); None for a term the options leave out, so plain NLL forms G as before."""
    eps, zl, V = terms["label_smoothing"], terms["z_loss"], terms["vocab"]
    dft = terms["loss_type"] == "dft"

    def coef(ic, lp, ent, lse, zsum):
        ai = a.index_select(0, ic)
        s = ai * lp.exp() if dft else ai
        g_lse = None
        if eps or zl:
            g_lse = s * eps if eps else torch.zeros_like(ai)
            if zl:
                g_lse = g_lse + (2 * zl) * lse * ai
        g_sum = s * (-eps / V) if eps else None
        return (s * -(1 - eps)).contiguous(), None, g_lse, g_sum
    return coef


def _finish(lp, stats, a, terms):
    """The loss from the pass's per-token [N] values (0 at ignored tokens, where a is 0)."""
    return (sft_terms(lp, stats["lse"], stats["zsum"], **terms) * a).sum()


def _metrics(ent, top1, mask):
    """The means TRL's SFTTrainer logs, and (under "_tokens", for sft_loss_tokens) the
    per-token values, 0 at ignored tokens."""
    dt = torch.float64 if ent.dtype == torch.float64 else torch.float32
    n = mask.sum().clamp(min=1).to(dt)
    ent, top1 = ent.detach().to(dt) * mask, top1.detach().to(dt) * mask
    return {"entropy": ent.sum() / n, "mean_token_accuracy": top1.sum() / n,
            "_tokens": (ent, top1)}


def _rows(V, H, weight, tt, backend, softcap, eps):
    """Tile rows of the pass: tile_rows' budget; under a soft cap with smoothing the tile also
    has tanh(x/c) [rows, V] fp32 beside it (VocabTiles._row_sums), so a third of the rows."""
    r = tile_rows(V, weight.device, weight.dtype, tt, H=H, backend=backend)
    return max(1, r // 3) if softcap is not None and eps else r


def _engine_recompute(h, w, b, y, mask, a, o, terms):
    """The recompute plan on the engine's generic op (alignkit.ops.linear_logprobs: backward
    recomputes each tile, 4 GEMMs, every backend): lp and H from the op; z_y = z(h·W_y + b_y)
    (O(N·H)), lse = z_y − lp and, without a soft cap, Σ_v z_v = (h·Σ_v W_v + Σ_v b_v)/T, all
    differentiable, so smoothing and z-loss need no logits here either."""
    lp, ent, stats = linear_logprobs_stats(h, w, y, bias=b, opts=o)
    ys = torch.where(mask, y, 0)
    x_y = (h * w.index_select(0, ys)).sum(-1, dtype=torch.float32)
    if b is not None:
        x_y = x_y + b.index_select(0, ys).float()
    z_y = (o.softcap * torch.tanh(x_y / o.softcap) if o.softcap is not None else x_y) * o.inv_temp
    lse = z_y - lp
    zsum = lse                    # not read without smoothing (sft_terms)
    if terms["label_smoothing"]:
        zsum = h.float() @ w.sum(0, dtype=torch.float32)
        if b is not None:
            zsum = zsum + b.sum(dtype=torch.float32)
        zsum = zsum * o.inv_temp
    loss = (sft_terms(lp, lse, zsum, **terms) * a).sum()
    return loss, _metrics(ent, (lp.detach() + stats[:, 1]) >= 0, mask)


def _torch_chunks(h, w, b, y, mask, a, lp_opts, terms, tiles):
    """The recompute plan where the engine's op cannot serve it (float64, whose GEMMs it runs in
    fp32; Σ_v z_v under a soft cap, which needs every logit): row chunks of full logits in
    torch, each under activation checkpointing (its logits are formed again in backward: 4
    GEMMs), in the inputs' dtype promoted to fp32 at least (float64 stays float64)."""
    V = w.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    t = tiles.resolved(head=tuple(w.shape))
    rows = max(1, t.tile_bytes // (6 * 4 * V))       # ~6 [rows, V] fp32 temporaries a chunk
    total = h.new_zeros((), dtype=acc)
    ents, tops = [], []
    ys = torch.where(mask, y, 0)
    for r0 in range(0, h.shape[0], rows):
        sl = slice(r0, r0 + rows)
        loss_c, ent_c, top_c = checkpoint(_chunk, h[sl], w, b, ys[sl], a[sl], lp_opts, terms,
                                          acc, use_reentrant=False)
        total = total + loss_c
        ents.append(ent_c)
        tops.append(top_c)
    ent = torch.cat(ents) if ents else h.new_zeros(0)
    top = torch.cat(tops) if tops else h.new_zeros(0)
    return total, _metrics(ent, top, mask)


def _chunk(h, w, b, y, a, o, terms, acc):
    x = (h @ w.t()).to(acc)
    if b is not None:
        x = x + b.to(acc)
    z = o.softcap * torch.tanh(x / o.softcap) if o.softcap is not None else x
    z = z * o.inv_temp
    lse = torch.logsumexp(z, -1)
    zy = z.gather(1, y[:, None]).squeeze(1)
    lp = zy - lse
    loss = (sft_terms(lp, lse, z.sum(-1), **terms) * a.to(acc)).sum()
    with torch.no_grad():
        logp = z - lse[:, None]
        ent = -(logp.exp() * logp).sum(-1)
        top = (zy >= z.max(-1).values).to(acc)
    return loss, ent, top


__all__ = ["sft_loss", "sft_loss_tokens", "sft_terms", "SFT_LOSS_TYPES"]
