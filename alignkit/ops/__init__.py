"""Launchers (input validation + backend dispatch) and the autograd of each op.

    alignkit.ops.linear_logprobs   fused LM head + log-probs (custom ops alignkit::linear_logprobs_*)
    alignkit.ops.logits_logprobs   log-probs from given logits (alignkit::logits_logprobs_*)
    alignkit.ops.tile_kernels      per-tile elementwise work, "cpp" and "torch" implementations
    alignkit.ops.tiling            tile sizes from the memory budget
    alignkit.ops.vocab_parallel    the op on a head split over the vocabulary across ranks
    alignkit.ops.vocab_shard       its layouts (DTensor Shard(0), vocab_group) and the merge
"""
