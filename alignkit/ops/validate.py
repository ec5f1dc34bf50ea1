"""Input checks shared by the launchers: every error names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float(name: str, t: torch.Tensor):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
                        f"got dtype {t.dtype}")


def check_labels(labels: torch.Tensor, expected_shape, what: str):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels must have shape {tuple(expected_shape)} ({what}), "
                         f"got {tuple(labels.shape)}")


def check_same_device(**tensors):
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"all inputs must be on one device, got {desc}")


def check_linear_inputs(hidden, weight, labels, bias):
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-dim tensor")
    V, H = weight.shape
    if V == 0 or H == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H >= 1, got {tuple(weight.shape)}")
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden's last dim must equal weight's H={H} (weight is [V, H] = "
                         f"{tuple(weight.shape)}), got hidden {tuple(hidden.shape)}")
    check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape [V] = ({V},), got {tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int):
    """Data-dependent check, run inside the op (not while torch.compile traces)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; "
                         f"got {int(labels.flatten()[i])} at flat position {i}")


def labelled_rows(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Flat indices of the labelled tokens of flat int64 labels, after check_label_range.

    On CUDA with one host read: the bad-label count and the labelled count come back together
    (one .tolist()), and the count sizes nonzero_static, where check_label_range's bool() and
    nonzero() would stall the queue twice. The count is the one read the op cannot drop: it sizes
    the GEMMs, which would otherwise run over the ignored rows too (prompts, padding). On CPU a
    read costs nothing to the queue and nonzero() is the faster compaction (nonzero_static ran
    6x slower on 100k labels here)."""
    keep = labels != ignore_index
    if not _sized(keep):
        check_label_range(labels, vocab, ignore_index)
        return compact(keep)
    n, = _checked_counts(labels, keep, keep.sum().reshape(1), vocab, ignore_index)
    return compact(keep, n)


def labelled_per_segment(labels: torch.Tensor, seg: torch.Tensor, S: int, vocab: int,
                         ignore_index: int):
    """(idx, counts, counts_host) of flat int64 labels with each token's segment seg [N] in
    [0, S) (an ignored token's id is not read): the flat indices of the labelled tokens (as
    labelled_rows), and each segment's labelled-token count, on the device [S] and as host
    ints. One host read, on CUDA as on CPU: the bad-label count comes back with the S counts
    (one .tolist()), and their sum sizes the compaction (the single pass's forward, where the
    counts also choose its unscaled group: pair_pass._grads)."""
    keep = labels != ignore_index
    counts = segment_counts(keep, seg, S)
    host = _checked_counts(labels, keep, counts, vocab, ignore_index)
    return compact(keep, sum(host)), counts, host


def segment_counts(keep: torch.Tensor, seg: torch.Tensor, S: int) -> torch.Tensor:
    """The number of True entries of keep [N] in each of the S segments seg [N] (int64 [S], on
    keep's device, no host read); a False entry's segment id is not read."""
    return torch.zeros(S, dtype=torch.long, device=keep.device).index_add_(
        0, seg.clamp(0, S - 1), keep.long())


def _checked_counts(labels, keep, counts, vocab: int, ignore_index: int) -> list:
    """counts (int64 [k] on the device) as host ints, read together with the count of labels
    out of [0, vocab): one .tolist(). Raises, naming the first bad label, where there is one."""
    bad = keep & ((labels < 0) | (labels >= vocab))
    *host, n_bad = torch.cat([counts, bad.sum().reshape(1)]).tolist()
    if n_bad:
        check_label_range(labels, vocab, ignore_index)
    return host


def compact(keep: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Flat indices of keep's True entries. On CUDA with a known count, nonzero_static: no host
    read (labelled_rows' forward, and the backward that reuses its count); else nonzero()."""
    if count is not None and _sized(keep):
        return torch.nonzero_static(keep, size=count).squeeze(1)
    return keep.nonzero().squeeze(1)


def _sized(keep: torch.Tensor) -> bool:
    """Whether compact uses the count it is given: on CUDA (the tests force it on CPU to count
    the host reads a card would see)."""
    return keep.is_cuda


def check_segment_ids(segment_ids, labels: torch.Tensor, num_segments):
    """Layout checks of packed segment ids (shape, dtype, num_segments); returns the flat int64
    ids. The data-dependent range check is check_segment_range."""
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype.is_floating_point or \
            segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        what = segment_ids.dtype if isinstance(segment_ids, torch.Tensor) else \
            type(segment_ids).__name__
        raise TypeError(f"segment_ids must be an integer tensor, got {what}")
    if tuple(segment_ids.shape) != tuple(labels.shape):
        raise ValueError(f"segment_ids must have the shape of labels {tuple(labels.shape)}, "
                         f"got {tuple(segment_ids.shape)}")
    if segment_ids.device != labels.device:
        raise ValueError(f"segment_ids must be on labels' device {labels.device}, got "
                         f"{segment_ids.device}")
    if num_segments is not None and (isinstance(num_segments, bool) or
                                     not isinstance(num_segments, int) or num_segments < 0):
        raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
    return segment_ids.reshape(-1).long()


def check_segment_range(seg: torch.Tensor, num_segments):
    """Ids in [0, num_segments); with num_segments None, returns max id + 1, refused beyond the
    token count (an id past it names no sequence that could hold a token, and the per-segment
    buffers would be sized by a stray value: one id of 2**40 would ask for terabytes)."""
    if seg.numel() == 0:
        return 0 if num_segments is None else num_segments
    if torch.compiler.is_compiling():
        # a traced graph cannot branch on the ids: the count must be static, and the range is
        # checked where the graph runs (raises on CPU; a device-side assert on CUDA)
        if num_segments is None:
            raise ValueError("under torch.compile, packed segment_ids need the segment count "
                             "as a static int (num_segments; for policy_loss, advantages [S]): "
                             "it sizes the per-sequence outputs")
        torch._assert_async(((seg >= 0) & (seg < num_segments)).all(),
                            f"segment_ids must be in [0, num_segments={num_segments})")
        return num_segments
    lo, hi = int(seg.min()), int(seg.max())
    if lo < 0:
        raise ValueError(f"segment_ids must be >= 0 (mark padding with ignore_index labels), "
                         f"got {lo}")
    if num_segments is None:
        if hi >= seg.numel():
            raise ValueError(f"segment_ids has max {hi}, more segments than the {seg.numel()} "
                             "tokens; renumber the segments from 0, or pass num_segments")
        return hi + 1
    if hi >= num_segments:
        raise ValueError(f"segment_ids must be < num_segments={num_segments}, got {hi}")
    return num_segments


def sequence_layout(labels: torch.Tensor, segment_ids, num_segments, *, who: str,
                    hidden: torch.Tensor | None = None):
    """The one place a front door's sequences are worked out: (seg, S). Padded input, labels
    [S, T] (and hidden [S, T, H] where given): seg None, S rows. Packed input, labels [N] with
    segment_ids [N]: seg the flat int64 ids, S = num_segments or max id + 1 (one sync; under
    torch.compile num_segments is required). Raises, naming the argument and the caller `who`,
    before any work is done."""
    if segment_ids is None:
        if labels.dim() != 2 or (hidden is not None and hidden.dim() != 3):
            got = f"labels {tuple(labels.shape)}" + (
                f" and hidden {tuple(hidden.shape)}" if hidden is not None else "")
            raise ValueError(f"{who}: padded input needs hidden [S, T, H] and labels [S, T]; for "
                             f"packed input (hidden [N, H], labels [N]) pass segment_ids [N]. "
                             f"Got {got} and no segment_ids")
        if num_segments is not None:
            raise ValueError(f"{who}: num_segments applies to packed input (with segment_ids); "
                             "padded input has one sequence per row")
        return None, labels.shape[0]
    seg = check_segment_ids(segment_ids, labels, num_segments)
    return seg, check_segment_range(seg, num_segments)
