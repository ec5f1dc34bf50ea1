"""alignkit.distill_loss: knowledge distillation from two LM heads' hidden states, TRL 1.16's
generalized JSD (its DistillationTrainer's ``ChunkedDivergenceFunction``), fused."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from alignkit.ops.distill_pass import distill


def distill_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                 teacher_weight: Tensor, labels: Tensor, *, beta: float = 1.0,
                 temperature: float = 1.0, student_bias: Optional[Tensor] = None,
                 teacher_bias: Optional[Tensor] = None, ignore_index: int = -100,
                 num_items=None, tiles=None):
    """The generalized Jensen-Shannon divergence between the student's and the teacher's
    next-token distributions, per labelled token, never forming [N, V] logits.

    With z = (h·Wᵀ + b) / temperature for each head, s = log_softmax(z_s), t = log_softmax(z_t)
    over the full vocabulary (TRL 1.16's definition, trl/kernels/chunked_divergence.py):

        beta = 0      D = KL(p_t ‖ p_s)                                   forward KL
        beta = 1      D = KL(p_s ‖ p_t)                                   reverse KL
        0 < beta < 1  D = β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m),  m = (1 − β)·p_s + β·p_t
                      (the generalized JSD of Agarwal et al. 2024, "On-Policy Distillation of
                      Language Models", arXiv:2306.13649)

        loss = Σ_{labelled t} D_t / n,   n = the labelled-token count, or num_items where given
        (the count of the whole accumulation window: the loss is then a sum / num_items).

    The temperature divides both heads' logits; the loss is not multiplied by temperature².

    Shapes: student_hidden [..., H_s], student_weight [V, H_s], teacher_hidden [..., H_t],
    teacher_weight [V, H_t] (the hidden sizes may differ; the vocabulary must be shared),
    student_bias / teacher_bias [V], labels [...] (student_hidden.shape[:-1]): only whether a
    label equals ignore_index is read (a position's divergence needs no target token).

    Gradients flow to student_hidden, student_weight and student_bias. The teacher is a
    constant: no gradient reaches teacher_hidden, teacher_weight or teacher_bias even where they
    require one (as TRL's ChunkedDivergenceFunction; teachers are often loaded trainable).

    The pass (alignkit/ops/distill_pass.py): each tile of labelled rows holds both heads' logits
    over the full vocabulary, so both log-sum-exps, the divergence, the entropy and the gradient
    with respect to the student's logits come from one tile, in forward: 4 GEMMs (both heads'
    logits, G·W_s, Gᵀ·h_s). Past tiles.memory it falls back to a recompute (forward 2 GEMMs,
    backward 4). tiles: alignkit.TileOptions (memory, plan, single_pass_bytes, tile_bytes).

    Returns (loss, metrics): loss 0-dim (fp32; float64 for float64 inputs); metrics
    {"entropy": the student's mean entropy over the labelled tokens, 0-dim, detached}
    (TRL's logged key).
    """
    loss, ent = distill(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                        beta=beta, temperature=temperature, student_bias=student_bias,
                        teacher_bias=teacher_bias, ignore_index=ignore_index,
                        num_items=num_items, tiles=tiles)
    n = (labels != ignore_index).sum().clamp(min=1)
    return loss, {"entropy": ent.sum() / n}
