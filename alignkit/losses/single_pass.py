"""Single-pass gradients for B preference pairs: the gradient is formed in the forward pass.

For a pair whose loss depends on the two sequence log-probs only through u = a_c·c − a_r·r
(c, r the loss's log-probs of chosen and rejected; a = 1, or 1/|tokens| for IPO-style
normalisation), the gradient w.r.t. the logits z_t of a token t of sequence s is
    dL/dz_t = f'(u) · (±a_s·w_s) · (onehot(y_t) − p_t)          (+ for chosen, − for rejected)
with w_s = 1 for sums and 1/|s| for averages. Everything but the scalar k = f'(u) is known per
token once its row's log-sum-exp is, so a tile spanning the whole vocabulary [rows, V] gives, in
the forward pass:
    lp_t                      (the log-prob, for the loss),
    G_t = ±a_s·w_s·(onehot − p_t)   in place of the tile (the C++ / torch grad kernel),
    grad_h_t = G_t · W        (unscaled; written straight into the [N, H] gradient buffer),
    A += G_tᵀ · h_t           (one [V, H] accumulator, which becomes grad_W).
After the pair's last tile the loss and k are known, and A, grad_h and grad_b are scaled by k in
place. Three GEMMs per tile instead of the recompute path's four: no tile is computed twice.

Several pairs. Each pair has its own k, and a second [V, H] accumulator per pair in flight would
break the memory budget (fused.py has the arithmetic). So one group goes unscaled into the empty
accumulators: the longest pair (the most labelled tokens). The other sequences' tokens are
deferred: their scalars are known only once every sequence is scored. Within the keep budget
(TileOptions.keep_bytes, keep_rows) a deferred token's G is formed once with a unit scalar and
kept, [rows, V], until the loss gives its sequence's scalar; then gh = s·(G·W) and
grad_W += Gᵀ·(s·h): 3 GEMMs. Past the budget a deferred token is scored forward only first and
its tile formed again with the scalar known: 4 GEMMs (its logits twice).

Tied (the group is the whole pair): SimPO; DPO types that are a function of the log-ratio
difference (sigmoid incl. cDPO, hinge, robust, exo_pair, discopop, aot, aot_unpaired; ipo and
sigmoid_norm with the count normalisation), alone or combined. The tie is a property of the loss
type (registry: LossSpec.tie).

Untied (any other loss of the pair: DPO with sft, nca_pair, bco_pair, sppo_hard, apo_*, CPO and
ORPO with their NLL term): dL/dc and dL/dr are two unrelated scalars, so the group is the
longest sequence alone, and every other sequence is deferred: one pair of equal lengths past the
keep budget costs (3C + 4R) / 3(C + R), about 1.17x the three-GEMM floor.

Memory: A ([V, H] fp32, returned as grad_W), the [N, H] hidden-gradient buffer (returned as
grad_h) and one [rows, V] fp32 buffer, rows = (tile budget + keep budget) / (4V) at most,
whatever T and B are: the tile and the kept G rows share it. The triton backend in bf16: the
fp32 tile, and one bf16 buffer that holds the tile's G rows and the kept ones (keep_rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.losses.vocab_tiles import VocabTiles
from alignkit.ops.backends import cpu_has_amx, gemm_dtype, resolve
from alignkit.ops.options import LogprobOptions, TileOptions
from alignkit.ops.validate import compact, labelled_per_segment, labelled_rows


def tile_rows(V: int, device=None, dtype: torch.dtype = torch.float32, tiles=None,
              H: int | None = None, backend: str = "auto") -> int:
    """Token rows per [rows, V] tile, from the bytes an element costs: the triton backend, the
    fp32 tile plus, for bf16, G's bf16 copy for the two GEMMs (6; fp16 forms G over the tile, 4);
    the CPU backends, the fp32 tile (4), or the bf16 logits where the GEMMs run in bf16 (2: G is
    formed a vocab block at a time beside it). The budget: TileOptions.gpu_chunk_bytes on CUDA
    (1 GiB: 1395 rows at V=128256 in bf16, 6 bytes an element), where the GEMMs that read the
    tile want thousands of rows (each tile's Gᵀ·h reads and writes all of grad_W);
    .single_pass_bytes on CPU (64 MiB; the interpreter's triton tiles too). H: the head's hidden
    size, for single_pass_bytes' default (TileOptions.resolved)."""
    t = (tiles or TileOptions()).resolved(head=(V, H) if H is not None else None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    budget = t.gpu_chunk_bytes if device.type == "cuda" else t.single_pass_bytes
    if device.type == "cuda" or resolve(backend, device) == "triton":
        per = 6 if dtype == torch.bfloat16 else 4      # fp16 keeps G in the fp32 tile
    else:
        per = 2 if gemm_dtype(dtype, device) != torch.float32 else 4
    return max(1, budget // (per * V))


def keep_rows(V: int, H: int, device=None, dtype: torch.dtype = torch.float32,
              tiles=None, backend: str = "auto") -> int:
    """Token rows of G the single pass may keep for sequences whose scalar is not known yet.
    Where G has the tile's dtype (fp32; bf16 GEMMs on CPU) the kept rows share one buffer with
    the tile, formed in place: (tile budget + keep_bytes) / (V x itemsize), so keep_bytes is all
    the memory keeping adds, and 0 still keeps what the tile's own memory holds. The triton
    backend's bf16 G is written beside its fp32 tile, into a [rows, V] buffer that the kept rows
    share (no tile's G is written while G is kept): tile rows + keep_bytes / 2V (VocabTiles
    allocates it so). On CUDA at H=4096, V=128256 that keeps 3787 rows where a buffer of their
    own kept 2392: an untied pair of 4096 + 4096 tokens forms 309 tokens twice instead of 1704
    (bench.paper: 1.12x the 3-GEMM floor instead of 1.18x), in the same memory.
    (TileOptions.keep_bytes; default 3/10 of grad_W.)"""
    t = (tiles or TileOptions()).resolved(head=(V, H))
    device = torch.device(device) if device is not None else torch.device("cpu")
    budget = t.gpu_chunk_bytes if device.type == "cuda" else t.single_pass_bytes
    if resolve(backend, device) == "triton":
        if dtype == torch.bfloat16:
            return tile_rows(V, device, dtype, tiles, H=H, backend=backend) + \
                t.keep_bytes // (2 * V)
        return (budget + t.keep_bytes) // (4 * V)
    per = 2 if gemm_dtype(dtype, device) != torch.float32 else 4
    return (budget + t.keep_bytes) // (per * V)


def cpu_pass_pays(device) -> bool:
    """Whether this is a CPU where the fp32 pass measured faster than the recompute even with
    many tokens formed twice and at H=256: any CPU without AMX. Measured (bench/RESULTS.md):
    - AMD EPYC, AVX2 (Zen 3, this project's machine since 2026-12): 3-24% faster at every
      preference bench shape (B1-B3, the long pair, the trainer's head; H = 256-1024; DPO and
      ORPO) with no keep budget, up to 46-58% of the tokens formed twice, and for the token
      pass at H=256 and 512 (R2, R3);
    - AMD EPYC, AVX-512 (earlier sessions): faster for two pairs, as above;
    - the AMX Xeon: level or slower once part of the deferred tokens are formed twice at
      H <= 512, and for the token pass at H=256.
    The AMX Xeon keeps its own measured rules (keep_pays, policy._token_pass); so does CUDA,
    not measured yet."""
    return torch.device(device).type == "cpu" and not cpu_has_amx()


def keep_pays(deferred: int, kept: int, n: int, H: int, device="cpu") -> bool:
    """auto's rule for a pass with deferred tokens (n labelled tokens, `deferred` of them with a
    scalar known only at the end, `kept` of those within the keep budget; the rest formed
    twice). Where cpu_pass_pays: at most half of the tokens formed twice (on the AVX2 EPYC
    46% ran 1.14x the floor against the recompute's 1.25x; GSPO's 79% and 95%, nearly every
    token deferred, ran 1.34x and 1.17x against 1.29x and 1.04x). On the AMX Xeon in fp32
    ("The keep budget"): every deferred token kept, or at H >= 1024 at most 30% of the tokens
    formed twice; past that the recompute ran level or faster (H <= 512: the elementwise
    passes weigh more than the GEMM they save)."""
    if cpu_pass_pays(device):
        return deferred - kept <= 0.5 * n
    return kept >= deferred or (H >= 1024 and deferred - kept <= 0.3 * n)


GRAD_MODES = ("recompute", "single_pass", "auto")


def pass_blocker(hidden, weight, bias, grad_mode: str):
    """Why a single pass (the pair pass or the token pass) cannot serve a call, or, under
    grad_mode "auto", should not; None where it can. Both front doors (preference_loss,
    policy_loss) ask this one function."""
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if len(dtypes) != 1:
        return f"hidden, weight and bias must share one dtype, got {sorted(map(str, dtypes))}"
    if dtypes == {torch.float64}:
        return "float64 inputs take the recompute (its GEMMs run in fp32 either way)"
    # no gradient wanted (no_grad, or nothing requires one): the recompute op runs forward only,
    # one GEMM per tile and no [V, H] accumulator
    if grad_mode == "auto" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return "no input requires a gradient"
    return None


LONG_TILE_ROWS = 192


def long_tiles(weight, tiles=None) -> bool:
    """Whether full-vocabulary tiles hold the >= 192 rows where the single pass's GEMMs ran at
    speed: at B2 (V=151936, H=384) 192-row tiles ran 1.06x the floor against the recompute's
    1.24x on the AVX2 EPYC; 110-row tiles ran 17% slower than the recompute on the AMX Xeon
    (bench/RESULTS.md). On CPU only in fp32. In bf16 the pass holds its [V, H] accumulator in
    fp32, twice the bf16 grad_W, where the recompute's bf16 backward holds one vocab block of it
    (B1: 265 against 100 MiB; the memory bound at bf16 gradients is 108): faster on the Zen 5
    EPYC at three of four bench shapes (by 6-21%), but past the bound at all four; on the AMX
    Xeon it was also 5-13% slower."""
    if weight.device.type != "cuda" and weight.dtype != torch.float32:
        return False
    return tile_rows(weight.shape[0], weight.device, weight.dtype, tiles,
                     H=weight.shape[1]) >= LONG_TILE_ROWS


@dataclass(frozen=True)
class SinglePassOptions:
    loss_fn: object                  # (logps [2B], counts [2B]) -> (loss, metrics)
    num_sequences: int               # 2B
    average: bool
    norm: str                        # 'unit' | 'count' | 'untied'
    logprob: LogprobOptions
    rows: int                        # token rows per [rows, V] tile (tile_rows)
    vocab_block: int = 2048          # columns per logits GEMM inside a tile (TileOptions)
    keep: int = 0                    # deferred token rows whose G may be kept (keep_rows)


def _grads(hidden, weight, labels, bias, seg, o: SinglePassOptions, need_h, need_w, need_b):
    """The single pass of B pairs: (loss, sums, counts, gh, gw, gb), gradients of the loss formed
    here (None where not needed)."""
    S = o.num_sequences
    B = S // 2
    dev = hidden.device
    y = labels.reshape(-1)
    s = seg.reshape(-1)
    # the label range check, the labelled tokens and each sequence's count: one host read (on a
    # card, the one sync of the pass; the counts' sums size every compaction below)
    idx, counts, counts_host = labelled_per_segment(y, s, S, weight.shape[0],
                                                    o.logprob.ignore_index)
    sid = s.index_select(0, idx)                       # sequence of each labelled token
    counts_f = counts.to(torch.float32)
    per = counts_f.clamp(min=1).reciprocal()
    # dlogp/dlp_t: 1 for sums, 1/|s| for averages (the loss's log-prob units)
    w = per if o.average else torch.ones(S, device=dev)
    # One group U goes unscaled into the empty accumulators (its scalar gradient is known only
    # after its last token): the pair with the most labelled tokens (tied), or the longest
    # sequence (untied). R: the rest, whose scalars are known only once every sequence is
    # scored. R's first n_keep tokens (the keep budget, keep_rows) are formed once with a unit
    # scalar and their G kept: 3 GEMMs, like U. The others are scored first, forward only, and
    # formed again once their scalars are known: 4 GEMMs.
    tied = o.norm in ("unit", "count")
    p, n_u = unscaled_group(counts_host, tied)
    in_u = ((sid == p) | (sid == p + B)) if tied else sid == p
    u_sel, r_sel = compact(in_u, n_u), compact(~in_u, idx.numel() - n_u)
    n_keep = min(o.keep, r_sel.numel()) if (need_h or need_w or need_b) else 0
    k_sel, r_sel = r_sel[:n_keep], r_sel[n_keep:]
    tiles = VocabTiles(hidden, weight, labels, bias, idx, o.logprob, o.rows, o.vocab_block, need_h,
                   need_w, need_b, keep=n_keep)

    def sweep(sel, coef, keep=False):
        return tiles.sweep(sel, coef, keep)[0]

    if tied:
        # tied: dL/dr = −(a_r/a_c)·dL/dc, so the pair's tokens carry ±a_s·w_s. The tie is a
        # property of the loss type (registry: LossSpec.tie); tests check every tied type
        # against the recompute. No run-time check: it would be a sync, and NaN inputs would trip it.
        a = per if o.norm == "count" else torch.ones(S, device=dev)
        sign = torch.where(sid < B, 1.0, -1.0)
        tok_u = (sign * w[sid] * a[sid]).index_select(0, u_sel)
    else:
        a = torch.ones(S, device=dev)
        tok_u = w[sid].index_select(0, u_sel)
    # per-token log-probs of ~1e2 summed over up to 1e5 tokens: accumulate in float64
    sums64 = torch.zeros(S, dtype=torch.float64, device=dev)
    sums64.index_add_(0, sid[r_sel], sweep(r_sel, None).double())
    sums64.index_add_(0, sid[u_sel], sweep(u_sel, tok_u).double())
    if n_keep:
        sums64.index_add_(0, sid[k_sel], sweep(k_sel, w[sid].index_select(0, k_sel),
                                               keep=True).double())
    sums = sums64.float()
    logps = (sums / counts_f.clamp(min=1) if o.average else sums).detach()
    with _eager_autograd(), torch.enable_grad():
        logps.requires_grad_()
        loss, _ = o.loss_fn(logps, counts_f)
        g = torch.autograd.grad(loss, logps, allow_unused=True)[0]
    g = torch.zeros(S, device=dev) if g is None else g
    k = g[p] / a[p]                    # U's scalar: tied, that of the pair's chosen sequence
    for buf in (tiles.gh, tiles.gw, tiles.gb):
        if buf is not None:
            buf.mul_(k)
    if n_keep:
        tiles.finish_kept(k_sel, g.index_select(0, sid.index_select(0, k_sel)))
    if r_sel.numel():
        sweep(r_sel, (g * w)[sid].index_select(0, r_sel))
    return loss.detach(), sums, counts, tiles.gh, tiles.gw, tiles.gb


_AUTOCAST_KEYS = [getattr(torch._C.DispatchKey, k) for k in dir(torch._C.DispatchKey)
                  if k.startswith("Autocast")]


def _eager_autograd():
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


def unscaled_group(counts, tied: bool):
    """(p, labelled tokens of U) from the sequences' labelled-token counts (2B host ints): U is
    the pair p with the most labelled tokens (tied; p indexes pairs) or the longest sequence p
    (untied); the first such on a tie."""
    B = len(counts) // 2
    sizes = [counts[i] + counts[i + B] for i in range(B)] if tied else list(counts)
    p = max(range(len(sizes)), key=sizes.__getitem__)
    return p, sizes[p]


def _stash(ctx, bufs, form, o, need, hidden, weight, labels, bias, *extra):
    """forward's side of a pass whose gradients it formed: bufs (gh, gw, gb) go back scaled in
    place (no second [V, H] buffer). They are held on ctx, not saved for backward (a saved tensor
    changed in place fails autograd's version check); a second backward (retain_graph=True)
    forms them again from the inputs with form(hidden, weight, labels, bias, *extra, o, *need)."""
    ctx.bufs, ctx.form, ctx.o, ctx.need, ctx.n_extra = bufs, form, o, need, len(extra)
    ctx.save_for_backward(hidden, weight, labels, bias, *extra)


def _scaled_grads(ctx, grad_loss):
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


def _needs(ctx, bias):
    return (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3])


class _SinglePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, seg, o: SinglePassOptions):
        need = _needs(ctx, bias)
        loss, sums, counts, gh, gw, gb = _grads(hidden, weight, labels, bias, seg, o, *need)
        _stash(ctx, (gh, gw, gb), _grads, o, need, hidden, weight, labels, bias, seg)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, _gs, _gc):
        return _scaled_grads(ctx, grad_loss)


def single_pass_loss(hidden, weight, labels, bias, seg, o: SinglePassOptions):
    """(loss, sums [2B], counts [2B]) for B pairs (seg: each token's sequence in [0, 2B));
    loss differentiable w.r.t. hidden, weight, bias. The callers (preference_loss) have checked
    shapes, dtypes, devices and segment ids; the label range is checked in _grads, as the
    generic op's launcher does, before any tile is formed (in the pass's one host read)."""
    return _SinglePass.apply(hidden, weight, labels.long(), bias, seg.long(), o)


@dataclass(frozen=True)
class TokenPassOptions:
    """A token-level loss L = Σ_t f_t(lp_t, H_t): each token's coefficients are known as soon as
    its row is scored, so every tile is formed once (3 GEMMs for any number of sequences).
    coef: (token indices, lp, ent) -> (dL/dlp, dL/dH or None) of a tile's rows; finish: (lp [N],
    ent [N] or None) -> the loss (0-dim); entropy: fold the entropy statistics.

    coupled: a loss whose dL/dlp_t is known only once every token is scored (sequence-level
    importance sampling: w_s = mean of lp − old over s), with no gradient through the entropy.
    coef is not read: dL/dlp comes from finish by autograd at the end. The first `keep` tokens
    (keep_rows) are formed once with a unit coefficient and their G kept until then (3 GEMMs);
    the others are scored first and formed again (4 GEMMs)."""
    coef: object
    finish: object
    logprob: LogprobOptions
    rows: int
    vocab_block: int = 2048
    entropy: bool = False
    coupled: bool = False
    keep: int = 0


def _token_grads(hidden, weight, labels, bias, o: TokenPassOptions, need_h, need_w, need_b):
    y = labels.reshape(-1)
    # the label range check and the labelled tokens: one host read (labelled_rows)
    idx = labelled_rows(y, weight.shape[0], o.logprob.ignore_index)
    need = need_h or need_w or need_b
    M = idx.numel()
    n_keep = min(o.keep, M) if o.coupled and need else 0
    tiles = VocabTiles(hidden, weight, labels, bias, idx, o.logprob, o.rows, o.vocab_block, need_h,
                   need_w, need_b, entropy=o.entropy, keep=n_keep)
    sel = torch.arange(M, device=hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)

    def full(x):                                  # labelled-token values -> [N]
        return torch.zeros(y.numel(), **f32).index_copy_(0, idx, x) if x is not None else None
    if not o.coupled:
        lp, ent = tiles.sweep(sel, o.coef if need else None)
        return o.finish(full(lp), full(ent)), full(lp), full(ent), tiles.gh, tiles.gw, tiles.gb
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
    return loss.detach(), lp_all, ent_all, tiles.gh, tiles.gw, tiles.gb


class _TokenPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, o: TokenPassOptions):
        need = _needs(ctx, bias)
        loss, lp, ent, gh, gw, gb = _token_grads(hidden, weight, labels, bias, o, *need)
        _stash(ctx, (gh, gw, gb), _token_grads, o, need, hidden, weight, labels, bias)
        ctx.mark_non_differentiable(lp)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return loss.detach(), lp, ent

    @staticmethod
    def backward(ctx, grad_loss, _glp, _gent):
        return _scaled_grads(ctx, grad_loss)


def token_pass_loss(hidden, weight, labels, bias, o: TokenPassOptions):
    """(loss, lp [N], ent [N] or None) of a token-level loss, its gradient w.r.t. hidden, weight
    and bias formed in the forward pass (see TokenPassOptions). The caller validated the inputs;
    the label range is checked in _token_grads, before any tile is formed (in the pass's one
    host read)."""
    return _TokenPass.apply(hidden, weight, labels.long(), bias, o)
