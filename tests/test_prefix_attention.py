"""alignkit.model.prefix_attention: a response's queries over [prompt, own] keys as two CPU flash calls
merged by log-sum-exp, against a float64 oracle of the masked softmax, forward and every
gradient (the trainer-level use:
test_long_sequences.test_shared_prompt_runs_the_prompt_queries_once)."""
import pytest
import torch

from alignkit.model.prefix_attention import applies, prefix_causal


def oracle(q, kp, vp, k, v, scale):
    """float64 softmax attention of the R queries at positions P..P+R-1 over [prefix, own]
    (causal aligned at the bottom right), GQA by repeating the key/value heads."""
    q, kp, vp, k, v = (t.double() for t in (q, kp, vp, k, v))
    K, Vv = torch.cat([kp, k], 2), torch.cat([vp, v], 2)
    g = q.shape[1] // K.shape[1]
    K, Vv = K.repeat_interleave(g, 1), Vv.repeat_interleave(g, 1)
    R, P = q.shape[2], kp.shape[2]
    s = (q @ K.transpose(-1, -2)) * scale
    keep = torch.ones(R, P + R, dtype=torch.bool).tril(P)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ Vv


def leaves(B, Hq, Hkv, P, R, D, dtype, amp=1.0, seed=0):
    """q, kp, vp, k, v as transposed views of [B, L, H, D] rows, as transformers hands them."""
    gen = torch.Generator().manual_seed(seed)

    def t(h, n, a=1.0):
        x = (torch.randn(B, n, h, D, generator=gen) * a).to(dtype).transpose(1, 2)
        return x.detach().requires_grad_()
    return t(Hq, R, amp), t(Hkv, P, amp), t(Hkv, P), t(Hkv, R, amp), t(Hkv, R)


CASES = [  # B, Hq, Hkv, P, R, D, amp (amp 4: logits in the tens)
    (1, 4, 4, 37, 29, 16, 1.0),
    (2, 6, 2, 5, 70, 32, 1.0),        # GQA, a short prompt
    (1, 2, 2, 300, 1, 8, 4.0),        # one query, large logits
    (1, 3, 1, 1, 130, 64, 4.0),       # a one-token prompt
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_causal_matches_the_float64_oracle(case, dtype):
    """Output and the gradients of q, kp, vp, k, v. Tolerance: fp32, 2e-5 relative to each
    tensor's largest entry (the kernel's fp32 sums over <= 430 keys); bf16, 3x the error that
    the plain masked SDPA in bf16 makes on the same inputs (bf16's own error on this attention)."""
    B, Hq, Hkv, P, R, D, amp = case
    scale = D ** -0.5
    ins = leaves(B, Hq, Hkv, P, R, D, dtype, amp)
    assert applies(ins[0], 0.0, None, None, P + R)
    gout = torch.randn(B, Hq, R, D, generator=torch.Generator().manual_seed(1))
    out = prefix_causal(*ins, scale)
    assert out.dtype == dtype and out.shape == (B, Hq, R, D)
    out.backward(gout.to(dtype).transpose(2, 3).contiguous().transpose(2, 3))   # strided grad
    got = [out.detach()] + [t.grad for t in ins]
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    ref = oracle(*ref_in, scale)
    ref.backward(gout.double())
    want = [ref.detach()] + [t.grad for t in ref_in]
    if dtype == torch.float32:
        tol = [2e-5 * w.abs().max().item() for w in want]
    else:
        import torch.nn.functional as F
        base_in = [t.detach().requires_grad_() for t in ins]
        K, Vv = torch.cat([base_in[1], base_in[3]], 2), torch.cat([base_in[2], base_in[4]], 2)
        keep = torch.ones(R, P + R, dtype=torch.bool).tril(P)
        base = F.scaled_dot_product_attention(base_in[0], K, Vv, attn_mask=keep, scale=scale,
                                              enable_gqa=Hq != Hkv)
        base.backward(gout.to(dtype))
        bgot = [base.detach()] + [t.grad for t in base_in]
        tol = [3 * (b.double() - w).abs().max().item() + 1e-6 for b, w in zip(bgot, want)]
    names = ["out", "dq", "dkp", "dvp", "dk", "dv"]
    for name, g, w, t in zip(names, got, want, tol):
        err = (g.double() - w).abs().max().item()
        assert err <= t, f"{name}: {err:.3g} > {t:.3g}"


def test_prefix_causal_ignores_nothing_a_mask_would_hide():
    """Changing the response's later keys must not move an earlier query's output (causality),
    while changing any prompt key moves every query's (the prompt block is unmasked)."""
    q, kp, vp, k, v = (t.detach() for t in leaves(1, 2, 2, 6, 5, 8, torch.float32))
    base = prefix_causal(q, kp, vp, k, v, 0.3)
    k2 = k.clone()
    k2[:, :, 3] += 5
    moved = (prefix_causal(q, kp, vp, k2, v, 0.3) - base).abs().amax((0, 1, 3))
    assert moved[:3].max() == 0 and moved[3:].min() > 0
    kp2 = kp.clone()
    kp2[:, :, 0] += 5
    assert (prefix_causal(q, kp2, vp, k, v, 0.3) - base).abs().amax((0, 1, 3)).min() > 0


def test_applies_only_where_the_merge_is_exact():
    q = torch.zeros(1, 2, 4, 8)
    assert applies(q, 0.0, None, None, 10) and applies(q, 0.0, None, 10, 10)
    assert not applies(q, 0.1, None, None, 10)                   # dropout
    assert not applies(q, 0.0, 30.0, None, 10)                   # softcap
    assert not applies(q, 0.0, None, 9, 10)                      # a window shorter than the keys
    assert not applies(q[:, :, :0], 0.0, None, None, 6)          # no query
    assert not applies(q.to("meta"), 0.0, None, None, 10)        # not a CPU tensor
    assert not applies(q.to(torch.int64), 0.0, None, None, 10)


def test_prefix_causal_under_autocast_casts_like_sdpa():
    """Under CPU bf16 autocast, mixed fp32/bf16 inputs (rotary embeddings hand back fp32 keys)
    run in bf16, as SDPA would run them, with gradients in each leaf's own dtype."""
    q, kp, vp, k, v = leaves(1, 2, 2, 9, 7, 16, torch.float32)
    qb = q.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prefix_causal(qb, kp, vp, k, v, 0.25)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert qb.grad.dtype == torch.bfloat16 and kp.grad.dtype == torch.float32
    want = prefix_causal(*(t.detach().bfloat16() for t in (qb, kp, vp, k, v)), 0.25)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_prefix_causal_traces_under_torch_compile():
    """A model compiled with fullgraph=True traces through the merge (an autograd.Function over
    the aten CPU flash ops): the same output and gradients as eager."""
    ins = leaves(1, 4, 2, 9, 6, 16, torch.float32)

    def f(q, kp, vp, k, v):
        return prefix_causal(q, kp, vp, k, v, 0.25).square().sum()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*ins)
    g_got = torch.autograd.grad(got, ins)
    want = f(*ins)
    g_want = torch.autograd.grad(want, ins)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
