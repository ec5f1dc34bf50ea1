"""Raw Triton kernels for the GPU path (installed as ``alignkit.kernels``).

No autograd here; launchers live in ``alignkit.ops.triton_path`` and autograd in ``alignkit.ops``
and ``alignkit.losses.single_pass``.
  linear_logprobs  fused linear log-probs: forward with logits in registers, backward modes
  logits_logprobs  log-probs of given logits, backward in place (also the single-pass losses'
                   [rows, V] tiles)
"""
