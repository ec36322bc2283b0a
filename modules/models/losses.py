"""Scale-invariant SNR and permutation-invariant training (PIT).

SI-SNR (Le Roux et al., "SDR - half-baked or well done?", ICASSP 2019): with zero-mean signals,
``s_t = <est, ref> ref / ||ref||^2``, ``e = est - s_t``, ``SI-SNR = 10 log10(||s_t||^2 / ||e||^2)``.
Utterance-level PIT (Kolbaek et al., 2017): the loss of a separation is the loss of the
assignment of estimates to references that maximises the mean SI-SNR.

Tensors follow SpeechBrain's separation layout ``[batch, time, n_src]``.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

EPS = 1e-8
_BRUTE_FORCE_MAX_SRC = 6


def si_snr(est: torch.Tensor, ref: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """SI-SNR in dB along the last dimension. ``[..., time]`` x ``[..., time]`` -> ``[...]``."""
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    scale = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * ref
    noise = est - target
    ratio = target.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps)
    return 10 * torch.log10(ratio + eps)


def pairwise_si_snr(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """SI-SNR of every estimate against every reference.

    ``est [batch, time, S]``, ``ref [batch, time, S]`` -> ``[batch, S_est, S_ref]``.
    """
    return si_snr(est.transpose(1, 2).unsqueeze(2), ref.transpose(1, 2).unsqueeze(1))


def best_permutation(scores: torch.Tensor) -> torch.Tensor:
    """Assignment maximising the mean of ``scores[b, perm[b, j], j]``.

    ``scores [batch, S_est, S_ref]`` -> ``perm [batch, S]`` where ``perm[b, j]`` is the estimate
    assigned to reference ``j``. Exhaustive for up to 6 sources, Hungarian algorithm beyond.
    """
    b, s, _ = scores.shape
    if s <= _BRUTE_FORCE_MAX_SRC:
        perms = torch.tensor(list(itertools.permutations(range(s))), device=scores.device)
        # total[b, p] = sum_j scores[b, perms[p, j], j]
        total = scores[:, perms, torch.arange(s, device=scores.device)].sum(-1)
        return perms[total.argmax(-1)]
    from scipy.optimize import linear_sum_assignment

    out = []
    for mat in scores.detach().cpu().numpy():
        rows, cols = linear_sum_assignment(-mat)
        perm = np.empty(s, dtype=np.int64)
        perm[cols] = rows
        out.append(perm)
    return torch.as_tensor(np.stack(out), device=scores.device)


def reorder(est: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the sources of ``est [batch, time, S]`` by ``perm [batch, S]``."""
    idx = perm.unsqueeze(1).expand(-1, est.shape[1], -1)
    return torch.gather(est, 2, idx)


def pit_si_snr(est: torch.Tensor, ref: torch.Tensor):
    """Permutation-invariant SI-SNR.

    ``est, ref [batch, time, S]`` -> (``si_snr [batch]`` mean over sources of the best assignment,
    ``perm [batch, S]``).
    """
    if est.shape != ref.shape:
        raise ValueError(f"estimates {tuple(est.shape)} and references {tuple(ref.shape)} differ")
    scores = pairwise_si_snr(est, ref)
    with torch.no_grad():
        perm = best_permutation(scores)
    s = scores.shape[-1]
    chosen = scores[torch.arange(scores.shape[0]).unsqueeze(1), perm, torch.arange(s)]
    return chosen.mean(-1), perm


def pit_si_snr_loss(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Negative PIT SI-SNR per utterance, ``[batch]`` (lower is better)."""
    return -pit_si_snr(est, ref)[0]
