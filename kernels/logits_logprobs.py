"""Triton kernels of the log-prob op on given logits (GPU path; exact under TRITON_INTERPRET=1).

_logits_fwd  one program per row: online LSE over vocab blocks, target gather, entropy statistics.
_logits_bwd  one program per row: writes dL/dx into `out`, which may be the logits buffer itself
             (in place: each element is read before the same program overwrites it).
Both take z = softcap·tanh(x/softcap)/T (HAS_SOFTCAP; the logits op itself refuses a softcap, the
single-pass losses' raw tile logits need it). The single-pass losses run the pair on each
[rows, V] tile a vendor GEMM wrote: two reads and one write per row.
"""
import triton
import triton.language as tl

if not __name__.startswith("alignkit."):
    # kernels/ has no __init__.py, so the repo root never shadows the hub package `kernels`
    # (issue #32); a top-level `kernels.*` import of these files is refused outright too.
    raise ImportError(f"{__file__} is reached as alignkit.kernels, not as {__name__!r}")

from .linear_logprobs import _transform


@triton.jit
def _logits_fwd(x_ptr, y_ptr, lp_ptr, m_ptr, logs_ptr, ent_ptr,
                N, V,
                stride_xn,
                inv_temp, softcap, ignore_index,
                HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_xn
    y = tl.load(y_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
        z, _ = _transform(x, inv_temp, softcap, HAS_SOFTCAP)
        z = tl.where(cmask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        first = m == float("-inf")
        c = tl.where(first, 0.0, tl.exp(m - m_new))
        zm = z - tl.where(m_new == float("-inf"), 0.0, m_new)   # no −inf − (−inf)
        e = tl.exp(zm)
        # 0·log 0 = 0: a −inf logit adds nothing (NaN still reaches s)
        a = (a + tl.where(first, 0.0, (m - m_new) * s)) * c \
            + tl.sum(tl.where(cmask & (e > 0), e * zm, 0.0), 0)
        s = s * c + tl.sum(e, 0)
        t += tl.sum(tl.where(cols == y, z, 0.0), 0)
        m = m_new
    logs = tl.log(s)
    keep = y != ignore_index
    tl.store(lp_ptr + row, tl.where(keep, (t - m) - logs, 0.0))
    tl.store(m_ptr + row, m)
    tl.store(logs_ptr + row, logs)
    tl.store(ent_ptr + row, tl.where(keep, logs - a / s, 0.0))


@triton.jit
def _logits_bwd(x_ptr, out_ptr, y_ptr, m_ptr, logs_ptr, g_ptr, ent_ptr, ge_ptr,
                N, V,
                stride_xn, stride_on,
                inv_temp, softcap,
                HAS_SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row)
    m = tl.load(m_ptr + row)
    logs = tl.load(logs_ptr + row)
    g = tl.load(g_ptr + row)
    if HAS_ENT:
        ent = tl.load(ent_ptr + row)
        ge = tl.load(ge_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        x = tl.load(x_ptr + row * stride_xn + cols, mask=cmask, other=0.0).to(tl.float32)
        z, dzdx = _transform(x, inv_temp, softcap, HAS_SOFTCAP)
        zl = (z - m) - logs
        p = tl.exp(zl)
        d = g * (tl.where(cols == y, 1.0, 0.0) - p)
        if HAS_ENT:
            d -= tl.where(p > 0, ge * p * (zl + ent), 0.0)   # 0·(−inf) = 0
        tl.store(out_ptr + row * stride_on + cols, (d * dzdx).to(out_ptr.dtype.element_ty),
                 mask=cmask)
