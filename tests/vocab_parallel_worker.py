"""One gloo rank of tests/test_vocab_parallel.py (run as a script: rank, world size, a FileStore
path and an output path on the command line). Every case runs the op or loss on this rank's shard
of a head and on the whole head in this process (the single-process engine), and compares the
loss, the per-token outputs and every gradient (grad_W and grad_b as this rank's shard of the
whole head's) in fp32 within 1e-5 relative. Writes {"cases": [...], "calls": n, "comm": {...}}."""
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import alignkit
from alignkit.losses import kto_loss
from alignkit.ops import plan, vocab_parallel
from alignkit.bench.profiling import CollectiveLog

V, H = 203, 24          # V prime: uneven shards at every world size


def close(a, b, what):
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-5 * scale):
        err = float((a - b).abs().max()) if a.shape == b.shape else "shape"
        raise AssertionError(f"{what}: max error {err} (scale {scale}) on rank {dist.get_rank()}")


def plain_shard(t, rank, world):
    """Megatron's layout, uneven the other way from torch.chunk: the first ranks longer."""
    return torch.tensor_split(t, world)[rank]


def inputs(seed, S=4, T=9, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g)
    h = torch.randn(S, T, H, generator=g) * 2
    y = torch.randint(0, V, (S, T), generator=g)
    y[:, :3] = ignore                        # prompts
    y[1, -2:] = ignore                       # padding
    y[0, 3] = V - 1                          # the last shard's last row
    y[2, 4] = 0
    return W, b, h, y


def heads(W, b, form, mesh, rank, world):
    """(weight, bias, tiles kw, local shard of grad: fn(full grad) -> rank's part)."""
    if form.startswith("dtensor"):
        if form == "dtensor2d":      # the vocab split on the second dim of a (dp, tp) mesh
            mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
            pl = [Replicate(), Shard(0)]
        else:
            pl = [Shard(0)]
        w = distribute_tensor(W.clone(), mesh, pl).requires_grad_()
        bb = distribute_tensor(b.clone(), mesh, pl).requires_grad_()
        return w, bb, {}, lambda g: torch.chunk(g, world)[rank] if rank < len(
            torch.chunk(g, world)) else g[:0]
    w = plain_shard(W, rank, world).clone().requires_grad_()
    bb = plain_shard(b, rank, world).clone().requires_grad_()
    kw = {"vocab_group": dist.group.WORLD}
    if form == "plain-start":        # the offset given rather than derived
        kw["vocab_start"] = sum(len(x) for x in torch.tensor_split(W, world)[:rank])
    return w, bb, kw, lambda g: plain_shard(g, rank, world)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def run_case(name, fn, W, b, h, form, mesh, rank, world, tiles_kw=None):
    """fn(h, w, bias, tiles) -> (scalar loss, dict of outputs); checks sharded vs whole."""
    w, bb, kw, part = heads(W, b, form, mesh, rank, world)
    hs = h.clone().requires_grad_()
    plan.LAST[:] = []
    loss, out = fn(hs, w, bb, alignkit.TileOptions(**kw, **(tiles_kw or {})))
    chosen = list(plan.LAST)
    loss.backward()
    Wf, bf, hf = W.clone().requires_grad_(), b.clone().requires_grad_(), h.clone().requires_grad_()
    ref_loss, ref_out = fn(hf, Wf, bf, alignkit.TileOptions(autotune=False, **(tiles_kw or {})))
    ref_loss.backward()
    close(loss, ref_loss, f"{name}/{form} loss")
    for k in ref_out:
        close(out[k], ref_out[k], f"{name}/{form} {k}")
    close(hs.grad, hf.grad, f"{name}/{form} grad_h")
    close(local(w.grad), part(Wf.grad), f"{name}/{form} grad_W")
    close(local(bb.grad), part(bf.grad), f"{name}/{form} grad_b")
    if hasattr(w.grad, "placements"):
        assert tuple(w.grad.placements) == tuple(w.placements), w.grad.placements
    return chosen


def cases(rank, world, mesh):
    done = []
    W, b, h, y = inputs(1)
    g = torch.Generator().manual_seed(7)
    g_lp, g_ent = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)

    def token_fn(softcap, temp):
        def fn(hs, w, bb, tiles):
            lp, ent = alignkit.linear_token_logprobs(hs, w, y, bias=bb, return_entropy=True,
                                                     softcap=softcap, temperature=temp,
                                                     tiles=tiles)
            return (lp * g_lp).sum() + (ent * g_ent).sum(), {"lp": lp, "ent": ent}
        return fn

    seg = torch.arange(4).repeat_interleave(9)          # packed: 4 segments of 9 tokens

    def packed_fn(hs, w, bb, tiles):
        s, c = alignkit.sequence_logprobs(hs.reshape(-1, H), w, y.reshape(-1), segment_ids=seg,
                                          num_segments=4, bias=bb, tiles=tiles)
        return (s * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum(), {"sums": s}

    def padded_fn(hs, w, bb, tiles):
        s, c = alignkit.sequence_logprobs(hs, w, y, average=True, bias=bb, tiles=tiles)
        return s.pow(2).sum(), {"means": s}

    for form in ("plain", "dtensor"):
        for softcap, temp in ((None, 1.0), (30.0, 0.7)):
            run_case(f"token(softcap={softcap},T={temp})", token_fn(softcap, temp), W, b, h,
                     form, mesh, rank, world)
        run_case("sequence packed", packed_fn, W, b, h, form, mesh, rank, world)
        run_case("sequence padded", padded_fn, W, b, h, form, mesh, rank, world)
        # a small tile budget: several row chunks and vocab blocks per shard
        run_case("token small tiles", token_fn(None, 1.0), W, b, h, form, mesh, rank, world,
                 dict(tile_bytes=4096, vocab_block=16))
        ref = torch.randn(4, generator=torch.Generator().manual_seed(3)) - 20
        for loss in ("dpo", "simpo", "orpo"):
            def pref_fn(hs, w, bb, tiles, loss=loss):
                kw = {"ref_logprobs": ref} if loss == "dpo" else {}
                val, m = alignkit.preference_loss(hs, w, y, loss=loss, bias=bb, tiles=tiles,
                                                  softcap=20.0, **kw)
                return val, {"chosen": m["logps/chosen"], "rejected": m["logps/rejected"]}
            chosen = run_case(f"preference {loss}", pref_fn, W, b, h, form, mesh, rank, world)
            # the chooser's one candidate: the sharded recompute, named with its reason
            assert chosen[0].plan == "recompute" and "vocab-parallel" in chosen[0].how, chosen
        pol = torch.Generator().manual_seed(5)
        adv = torch.randn(4, generator=pol)
        old = -torch.rand(y.shape, generator=pol) * 5

        def dapo_fn(hs, w, bb, tiles):
            val, m = alignkit.policy_loss(hs, w, y, advantages=adv, old_logprobs=old,
                                          loss_type="dapo", bias=bb, tiles=tiles, beta=0.0,
                                          temperature=0.9)
            return val, {}
        run_case("policy dapo", dapo_fn, W, b, h, form, mesh, rank, world)
        desirable = torch.tensor([True, False, True, False])
        ref_kto = torch.randn(4, generator=torch.Generator().manual_seed(9)) - 20

        def kto_fn(hs, w, bb, tiles):
            s, c = alignkit.sequence_logprobs(hs, w, y, bias=bb, tiles=tiles)
            val, m = kto_loss(s, ref_kto, desirable)
            return val, {"sums": s}
        run_case("kto", kto_fn, W, b, h, form, mesh, rank, world)
        done.append(form)
    # V = 4 over 3 ranks: torch.chunk gives (2, 2, 0), so rank 2's shard is empty
    y4 = torch.where(y == -100, y, y % 4)

    def tiny_fn(hs, w, bb, tiles):
        lp, ent = alignkit.linear_token_logprobs(hs, w, y4, bias=bb, return_entropy=True,
                                                 tiles=tiles)
        return (lp * g_lp).sum() + (ent * g_ent).sum(), {"lp": lp, "ent": ent}
    run_case("V=4", tiny_fn, W[:4], b[:4], h, "dtensor", mesh, rank, world)
    for form in ("dtensor2d", "plain-start"):
        run_case("token", token_fn(30.0, 0.7), W, b, h, form, mesh, rank, world)
        run_case("sequence packed", packed_fn, W, b, h, form, mesh, rank, world)
        done.append(form)
    # a pinned single pass is refused by name; the chooser's note names the sharded recompute
    w, bb, kw, _ = heads(W, b, "plain", mesh, rank, world)
    try:
        alignkit.preference_loss(h, w, y, loss="simpo", grad_mode="single_pass",
                                 tiles=alignkit.TileOptions(**kw))
        raise AssertionError("single_pass on a sharded head was not refused")
    except ValueError as e:
        assert "vocab-parallel" in str(e), e
    for bad, why in ((dict(backend="triton"), "triton"),):
        try:
            alignkit.linear_token_logprobs(h, w, y, tiles=alignkit.TileOptions(**kw), **bad)
            raise AssertionError(f"{bad} on a sharded head was not refused")
        except NotImplementedError as e:
            assert why in str(e), e
    try:
        alignkit.preference_loss(h, w, y, loss="dpo", ref_logprobs=torch.zeros(4),
                                 use_weighting=True, tiles=alignkit.TileOptions(**kw))
        raise AssertionError("use_weighting on a sharded head was not refused")
    except ValueError as e:
        assert "use_weighting" in str(e), e
    try:       # given starts that overlap (a fresh group: layouts are cached per group)
        alignkit.linear_token_logprobs(h, w, y, tiles=alignkit.TileOptions(
            vocab_group=dist.new_group(list(range(world))), vocab_start=0))
        raise AssertionError("overlapping vocab_start was not refused")
    except ValueError as e:
        assert "without gap or overlap" in str(e), e
    done.append("refusals")
    return done


def memory(rank, world):
    """Per-rank peak of one forward + backward beyond the inputs (alignkit.bench.profiling's exact
    peak), and its bounds."""
    from alignkit.bench.profiling import peak_memory_bytes
    Vm, Hm, N, tile = 4001, 64, 96, 64 << 10
    g = torch.Generator().manual_seed(4)
    w = plain_shard(torch.randn(Vm, Hm, generator=g), rank, world).clone().requires_grad_()
    h = torch.randn(N, Hm, generator=g).requires_grad_()
    y = torch.randint(0, Vm, (N,), generator=g)
    tiles = alignkit.TileOptions(vocab_group=dist.group.WORLD, tile_bytes=tile)
    alignkit.linear_token_logprobs(h, w, y, tiles=tiles)          # layout exchanged, cached

    def step():
        alignkit.linear_token_logprobs(h, w, y, return_entropy=False, tiles=tiles).sum().backward()
    peak = peak_memory_bytes(step)
    gw, gh = w.numel() * 4, N * Hm * 4
    # the target, (grad_W + W)/p + grad_h + the tile (W's shard is an input, held before
    # the window opens), and the single-process engine's own, 1.3 x (grad_W + grad_h) + the tile,
    # on the shard's grad_W
    return {"peak": peak, "target": 2 * gw + gh + tile, "engine": 1.3 * (gw + gh) + tile,
            "whole_grad_w": Vm * Hm * 4}


def comm_counts(rank, world):
    """The bytes of every collective in one forward and one backward of the entropy op."""
    W, b, h, y = inputs(2, S=3, T=17)
    w = plain_shard(W, rank, world).clone().requires_grad_()
    hs = h.clone().requires_grad_()
    tiles = alignkit.TileOptions(vocab_group=dist.group.WORLD)
    alignkit.linear_token_logprobs(hs, w, y, tiles=tiles)          # layout exchanged, cached
    with CollectiveLog() as fwd:
        lp, ent = alignkit.linear_token_logprobs(hs, w, y, return_entropy=True, tiles=tiles)
    with CollectiveLog() as fwd_plain:
        lp2 = alignkit.linear_token_logprobs(hs, w, y, tiles=tiles)
    with CollectiveLog() as bwd:
        (lp.sum() + ent.sum() + lp2.sum()).backward()
    labelled = int((y != -100).sum())
    return {"fwd": fwd.log, "fwd_plain": fwd_plain.log, "bwd": bwd.log, "labelled": labelled,
            "tokens": y.numel(), "H": H, "V": V}


def dropin(rank, world, mesh):
    """The HF drop-ins on a transformers model whose lm_head is hand-sharded (a DTensor, Shard(0)
    over the vocabulary, as a tp_plan leaves it): per-token outputs, the preference loss and every
    gradient equal the unsharded model's, and full_tensor() is never called."""
    import transformers
    from torch.distributed.tensor import DTensor

    from alignkit.integrations.hf import fused_preference_loss, pack_pairs
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(transformers.LlamaForCausalLM(cfg))
    ref, tp = models
    tp.lm_head.weight = torch.nn.Parameter(
        distribute_tensor(tp.lm_head.weight.detach().clone(), mesh, [Shard(0)]))
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 101, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    pairs = [([1, 2, 3], [4, 5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14], [15, 16, 17, 18])]
    before = vocab_parallel.CALLS[0]

    def forbidden(*a, **k):
        raise AssertionError("the drop-in gathered the vocab-parallel head (full_tensor)")
    real_full, DTensor.full_tensor = DTensor.full_tensor, forbidden
    try:
        outs = []
        for m in (tp, ref):
            with alignkit.patch_model(m, entropy=True):
                o = m(ids, labels=labels)
                (o.loss + 0.1 * o.entropy.sum()).backward()
                pl, _ = fused_preference_loss(m, pack_pairs(pairs), loss="simpo")
                pl.backward()
            outs.append((o, pl))
    finally:
        DTensor.full_tensor = real_full
    assert vocab_parallel.CALLS[0] > before
    (o, pl), (o_ref, pl_ref) = outs
    for k in ("loss", "log_probs", "entropy"):
        close(getattr(o, k), getattr(o_ref, k), f"drop-in {k}")
    close(pl, pl_ref, "drop-in preference loss")
    gw = tp.lm_head.weight.grad
    assert tuple(gw.placements) == (Shard(0),), gw.placements
    close(gw.to_local(), torch.chunk(ref.lm_head.weight.grad, world)[rank], "drop-in grad_W")
    for (n, p), (_, q) in zip(tp.model.named_parameters(), ref.model.named_parameters()):
        close(p.grad, q.grad, f"drop-in grad {n}")
    return "dropin"


def fsdp2d(rank, world):
    """4 ranks as a (dp=2, tp=2) mesh: FSDP2 on the body over dp, the head a DTensor
    (Replicate on dp, Shard(0) on tp). Each dp group has its own batch; the loss of each group,
    the head's gradient (averaged over dp by hand: FSDP does not hold the head) and the body's
    (FSDP's average over dp) equal one process on both batches. The drop-in's rule: the head is
    not FSDP's, so it goes to the op sharded; FSDP's own sharded parameter would be gathered."""
    import copy

    from torch.distributed.fsdp import fully_shard

    from alignkit.integrations.head import _head_tensors
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh.get_local_rank(0), mesh.get_local_rank(1)
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Embedding(V, H), torch.nn.Linear(H, H), torch.nn.Tanh())
    ref_body = copy.deepcopy(body)
    W = torch.randn(V, H) * 0.5
    fully_shard(body, mesh=mesh["dp"])
    head = distribute_tensor(W.clone(), mesh, [Replicate(), Shard(0)]).requires_grad_()
    assert _head_tensors(body, head, None)[0] is head
    assert not hasattr(_head_tensors(body, body[1].weight, None)[0], "placements")  # gathered
    batches = []
    for s in range(2):
        g = torch.Generator().manual_seed(20 + s)
        ids = torch.randint(0, V, (2, 11), generator=g)
        lab = torch.roll(ids, -1, 1)
        lab[:, :3] = -100
        lab[:, -1] = -100
        batches.append((ids, lab))
    ids, lab = batches[dp]
    loss, _ = alignkit.preference_loss(body(ids), head, lab, loss="simpo")
    loss.backward()
    ref_head = W.clone().requires_grad_()
    ref_losses = [alignkit.preference_loss(ref_body(i), ref_head, y, loss="simpo",
                                           tiles=alignkit.TileOptions(autotune=False))[0]
                  for i, y in batches]
    (sum(ref_losses) / 2).backward()
    close(loss, ref_losses[dp], "fsdp2d loss")
    gw = head.grad.to_local().clone()
    dist.all_reduce(gw, group=mesh.get_group("dp"))
    close(gw / 2, torch.chunk(ref_head.grad, world // 2)[tp], "fsdp2d grad_W")
    for (n, p), (_, q) in zip(body.named_parameters(), ref_body.named_parameters()):
        close(p.grad.full_tensor(), q.grad, f"fsdp2d grad {n}")
    return ["fsdp2d"]


def main(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    if world == 4:
        with open(out, "w") as f:
            json.dump({"cases": fsdp2d(rank, world), "calls": vocab_parallel.CALLS[0]}, f)
        dist.destroy_process_group()
        return
    mesh = init_device_mesh("cpu", (world,))
    done = cases(rank, world, mesh)
    if world == 2:
        done.append(dropin(rank, world, mesh))
    comm = comm_counts(rank, world)
    mem = memory(rank, world)
    with open(out, "w") as f:
        json.dump({"cases": done, "calls": vocab_parallel.CALLS[0], "comm": comm, "mem": mem}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    # the result is written: skip the interpreter's teardown, which once aborted a finished
    # rank of bench/vocab_parallel.py ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
