"""Run by tests/test_integrations_dist.py under torchrun (2 ranks, gloo): the HF helper's loss
through DDP, FSDP2, and a head sharded by a ZeRO-3-like stand-in; rank 0 saves the averaged
full gradients for the test to compare with one process on the whole batch.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_dropin_worker.py MODE OUT

(the test spawns the ranks itself: tests/ranks.py)
"""
import sys

import torch
import torch.distributed as dist

from alignkit.integrations.hf import fused_preference_loss, pack_pairs
from ranks import COLLECTIVE_TIMEOUT


def tiny():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def pairs():
    g = torch.Generator().manual_seed(7)

    def r(k):
        return torch.randint(0, 101, (k,), generator=g).tolist()
    return [(r(5), r(7), r(3)), (r(2), r(4), r(9)), (r(8), r(3), r(5)), (r(4), r(6), r(6))]


def one_process_grads():
    """The reference: one process, each rank's half of the pairs in turn, gradients averaged (each
    rank's loss is the mean over its pairs, and the ranks' gradients are averaged)."""
    model = tiny()
    grads = {}
    for r in range(2):
        model.zero_grad()
        loss, _ = fused_preference_loss(model, pack_pairs(pairs()[r::2], packing="padding_free"),
                                        loss="simpo", beta=2.0, gamma=0.5)
        loss.backward()
        for n, p in model.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad / 2
    return grads


class ShardedParam:
    """A ZeRO-3-like stand-in that shards a module's parameter for real: rank r keeps rows
    [r·V/w, (r+1)·V/w); between calls the parameter is an empty tensor. A forward pre-hook
    all-gathers it, a forward hook frees it and hooks the outputs so that their backward
    re-gathers it first; after the gradient accumulates it is averaged across ranks, each rank
    keeps its rows, and the parameter is freed again. Code that reads the weight outside the
    module's call (Liger's drop-in under ZeRO-3) sees the empty tensor."""

    def __init__(self, module, name="weight"):
        self.p = getattr(module, name)
        self.w, self.r = dist.get_world_size(), dist.get_rank()
        self.full_shape = self.p.shape
        self.rows = -(-self.full_shape[0] // self.w)          # equal shards, the last padded
        padded = torch.zeros(self.rows * self.w, *self.full_shape[1:])
        padded[:self.full_shape[0]] = self.p.data
        self.shard = padded[self.r * self.rows:(self.r + 1) * self.rows].clone()
        self.shard_grad = None
        self.release()
        module.register_forward_pre_hook(lambda m, a: self.gather())
        module.register_forward_hook(self.after_forward)
        self.p.register_post_accumulate_grad_hook(self.after_grad)

    def gather(self):
        if self.p.data.numel() == 0:
            parts = [torch.empty_like(self.shard) for _ in range(self.w)]
            dist.all_gather(parts, self.shard)
            self.p.data = torch.cat(parts)[:self.full_shape[0]].contiguous()

    def release(self):
        self.p.data = torch.empty(0, dtype=self.shard.dtype)

    def after_forward(self, module, args, out):
        tensors = out.values() if isinstance(out, dict) else (
            out if isinstance(out, (tuple, list)) else [out])
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g: (self.gather(), g)[1])
        self.release()

    def after_grad(self, p):
        g = p.grad
        dist.all_reduce(g)
        g /= self.w
        padded = torch.zeros(self.rows * self.w, *g.shape[1:])
        padded[:g.shape[0]] = g
        self.shard_grad = padded[self.r * self.rows:(self.r + 1) * self.rows].clone()
        p.grad = None
        self.release()

    def full_grad(self):
        parts = [torch.empty_like(self.shard_grad) for _ in range(self.w)]
        dist.all_gather(parts, self.shard_grad)
        return torch.cat(parts)[:self.full_shape[0]]


def main(mode, out):
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny()
    mine = pairs()[rank::world]
    batch = pack_pairs(mine, packing="padding_free")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    elif mode == "sharded_head":
        sharder = ShardedParam(model.lm_head)
        assert model.lm_head.weight.numel() == 0           # the hazard the hook guards against
        import alignkit
        try:                                                # reading the weight directly fails
            alignkit.linear_token_logprobs(torch.randn(3, 32), model.lm_head.weight,
                                           torch.tensor([1, 2, 3]))
            raise SystemExit("a direct read of the sharded weight did not fail")
        except ValueError as e:
            assert "weight" in str(e), e
        wrapped = model
    else:
        raise SystemExit(f"unknown mode {mode}")
    loss, _ = fused_preference_loss(wrapped, batch, loss="simpo", beta=2.0, gamma=0.5)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if mode == "sharded_head" and p is model.lm_head.weight:
            grads[n] = sharder.full_grad()
            continue
        g = p.grad
        if mode == "sharded_head":                          # the rest by hand, as DDP would
            dist.all_reduce(g)
            g = g / world
        grads[n] = g.full_tensor() if hasattr(g, "full_tensor") else g
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in grads.items()}, out)
    # both ranks leave together: a rank that tears gloo down while its peer still has a pending
    # exchange was seen to abort ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
