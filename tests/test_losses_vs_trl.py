"""alignkit's functional losses against TRL 1.16's own implementations, on the same log-probs."""
import pytest
import torch

from alignkit.losses import DPO_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, simpo_loss
from trl_oracle import trl_cpo, trl_dpo, trl_orpo

pytest.importorskip("trl")

B, L = 5, 13


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, L, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(1, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, L + 1, (1,), generator=g))
        mask[i, start:end] = 1
    ptl = -torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64) * 3 * mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 10 - 5
    return ptl, mask, ref


SMOOTHING = {"robust": 0.1, "exo_pair": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
# cdpo is alignkit's name for conservative DPO, which TRL 1.16 no longer has (its sigmoid ignores
# label_smoothing): pinned in test_trl_options_losses.py
TRL_DPO_TYPES = [t for t in DPO_LOSS_TYPES if t != "cdpo"]


@pytest.mark.parametrize("loss_type", TRL_DPO_TYPES)
def test_dpo_loss_types_match_trl(loss_type):
    ptl, mask, ref = _batch(hash(loss_type) % 1000)
    eps = SMOOTHING.get(loss_type, 0.0)
    t_loss, t_metrics = trl_dpo(ptl, mask, ref[:B], ref[B:], beta=0.2, loss_types=[loss_type],
                                label_smoothing=eps)
    sums = ptl.sum(1)
    counts = mask[:, 1:].sum(1).double()
    loss, m = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=0.2, loss_type=loss_type,
                       label_smoothing=eps, chosen_counts=counts[:B], rejected_counts=counts[B:])
    # rtol 1e-6: TRL builds exo_pair's ε as a float32 tensor
    assert torch.allclose(loss, t_loss.double(), rtol=1e-6, atol=1e-12), (loss, t_loss)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):
        assert abs(m[k].item() - t_metrics[k]) < 1e-9, k


def test_dpo_combined_types_match_trl():
    ptl, mask, ref = _batch(3)
    types, weights = ["sigmoid", "sft", "bco_pair"], [1.0, 0.5, 0.25]
    t_loss, _ = trl_dpo(ptl, mask, ref[:B], ref[B:], beta=0.1, loss_types=types,
                        loss_weights=weights)
    sums, counts = ptl.sum(1), mask[:, 1:].sum(1).double()
    loss, m = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=0.1, loss_type=types,
                       loss_weights=weights, chosen_counts=counts[:B], rejected_counts=counts[B:])
    assert torch.allclose(loss, t_loss.double(), rtol=1e-10)
    assert "nll" in m


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_cpo_matches_trl(loss_type):
    g = torch.Generator().manual_seed(4)
    c, r = -torch.rand(B, generator=g, dtype=torch.float64) * 4, -torch.rand(B, generator=g, dtype=torch.float64) * 4
    eps = 0.1 if loss_type == "sigmoid" else 0.0
    losses, _, _ = trl_cpo(c, r, beta=0.3, loss_type=loss_type, label_smoothing=eps)
    nll = torch.tensor(1.7, dtype=torch.float64)
    loss, m = cpo_loss(c, r, nll=nll, beta=0.3, cpo_alpha=0.5, loss_type=loss_type, label_smoothing=eps)
    assert torch.allclose(loss, losses.mean() + 0.5 * nll, rtol=1e-10)
    assert abs(m["rewards/chosen"].item() - (0.3 * c).mean().item()) < 1e-12


def test_simpo_matches_trl_cpo_simpo():
    g = torch.Generator().manual_seed(5)
    c, r = -torch.rand(B, generator=g, dtype=torch.float64) * 2, -torch.rand(B, generator=g, dtype=torch.float64) * 2
    losses, _, _ = trl_cpo(c, r, beta=2.0, loss_type="simpo", label_smoothing=0.1, simpo_gamma=0.8)
    loss, _ = simpo_loss(c, r, beta=2.0, gamma=0.8, label_smoothing=0.1)
    assert torch.allclose(loss, losses.mean(), rtol=1e-10)


def test_orpo_matches_trl():
    g = torch.Generator().manual_seed(6)
    c, r = -torch.rand(B, generator=g, dtype=torch.float64) * 2 - 0.01, -torch.rand(B, generator=g, dtype=torch.float64) * 2 - 0.01
    losses, cr, rr, ratio, log_odds = trl_orpo(c, r, beta=0.25)
    nll = torch.tensor(0.9, dtype=torch.float64)
    loss, m = orpo_loss(c, r, nll=nll, beta=0.25)
    # TRL's trainer: loss = nll − mean(β·log σ(log odds))
    assert torch.allclose(loss.double(), nll - losses.mean(), rtol=1e-6)
    assert abs(m["log_odds_ratio"].item() - ratio.item()) < 1e-6
    assert abs(m["log_odds_chosen"].item() - log_odds.item()) < 1e-6


def test_kto_matches_trl():
    from alignkit.losses import kto_loss
    from trl_oracle import trl_kto
    g = torch.Generator().manual_seed(9)
    N = 7
    mask = torch.zeros(N, L, dtype=torch.long)
    mask[:, 3:] = 1
    ptl = -torch.rand(N, L - 1, generator=g, dtype=torch.float64) * 2 * mask[:, 1:]
    labels = torch.tensor([True, False, True, True, False, True, False])
    ref = -torch.rand(N, generator=g, dtype=torch.float64) * 20
    pkl = -torch.rand(N, generator=g, dtype=torch.float64) * 20
    rkl = -torch.rand(N, generator=g, dtype=torch.float64) * 20 - 3
    t_loss, t_m = trl_kto(ptl, mask, labels, ref, pkl, rkl, beta=0.3, desirable_weight=1.2,
                          undesirable_weight=0.8)
    loss, m = kto_loss(ptl.sum(1), ref, labels, beta=0.3, desirable_weight=1.2,
                       undesirable_weight=0.8, policy_kl_logps=pkl, ref_kl_logps=rkl)
    assert torch.allclose(loss, t_loss.double(), rtol=1e-10)
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
        assert abs(m[k].item() - t_m[k]) < 1e-9, k
