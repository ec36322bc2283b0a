"""SI-SNR and PIT against slow, obviously correct versions."""

import itertools

import numpy as np
import pytest
import torch

from modules.models.losses import best_permutation, pairwise_si_snr, pit_si_snr, reorder, si_snr


def slow_si_snr(est, ref):
    """Textbook definition in float64 numpy."""
    est = est - est.mean()
    ref = ref - ref.mean()
    target = np.dot(est, ref) / np.dot(ref, ref) * ref
    noise = est - target
    return 10 * np.log10(np.dot(target, target) / np.dot(noise, noise))


def test_si_snr_matches_textbook_and_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 1000, generator=g, dtype=torch.float64)
    est = ref + 0.5 * torch.randn(3, 1000, generator=g, dtype=torch.float64)
    ours = si_snr(est, ref)
    for b in range(3):
        assert ours[b].item() == pytest.approx(slow_si_snr(est[b].numpy(), ref[b].numpy()), abs=1e-6)
    assert torch.allclose(si_snr(7.3 * est, ref), ours, atol=1e-6)
    assert torch.allclose(si_snr(est + 0.2, ref), ours, atol=1e-6)  # mean removed


@pytest.mark.parametrize("n_src", [1, 2, 3, 4, 7])
def test_pit_equals_brute_force(n_src):
    g = torch.Generator().manual_seed(n_src)
    ref = torch.randn(3, 400, n_src, generator=g, dtype=torch.float64)
    true_perm = torch.stack([torch.randperm(n_src, generator=g) for _ in range(3)])
    est = reorder(ref, true_perm) + 0.8 * torch.randn(3, 400, n_src, generator=g, dtype=torch.float64)
    score, perm = pit_si_snr(est, ref)
    for b in range(3):
        e, r = est[b].numpy(), ref[b].numpy()
        best = max(
            (np.mean([slow_si_snr(e[:, p[j]], r[:, j]) for j in range(n_src)]), p)
            for p in itertools.permutations(range(n_src))
        )
        assert score[b].item() == pytest.approx(best[0], abs=1e-6)
        assert tuple(perm[b].tolist()) == best[1]


def test_pairwise_and_reorder_layout():
    ref = torch.randn(2, 300, 3, dtype=torch.float64)
    est = ref[:, :, [2, 0, 1]]  # estimate j is reference perm[j]
    pw = pairwise_si_snr(est, ref)
    assert pw.shape == (2, 3, 3)
    perm = best_permutation(pw)
    assert torch.allclose(reorder(est, perm), ref)


def test_pit_gradient_flows():
    est = torch.randn(2, 200, 2, requires_grad=True)
    ref = torch.randn(2, 200, 2)
    (-pit_si_snr(est, ref)[0]).mean().backward()
    assert est.grad is not None and torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0
