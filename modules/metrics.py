"""Separation metrics for one utterance: SI-SNR, SI-SNRi, SDR, SDRi.

SDR is BSS-Eval's (Vincent et al., 2006) with a 512-tap distortion filter, computed by
``fast_bss_eval`` (Scheibler, 2022), which matches ``mir_eval.separation.bss_eval_sources``.
Metrics are always computed on the unclipped float signals.
"""

from __future__ import annotations

import numpy as np
import torch

from .losses import pit_si_snr, reorder, si_snr

METRIC_NAMES = ("si-snr", "si-snr_i", "sdr", "sdr_i")


def sdr(est: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """BSS-Eval SDR (dB) of each source, in the given order. ``est, ref [time, S]`` -> ``[S]``."""
    import fast_bss_eval

    # The torch backend of fast_bss_eval 0.1.4 works with numpy 2 (its numpy backend does not).
    r = ref.detach().double().cpu().T.contiguous()
    e = est.detach().double().cpu().T.contiguous()
    filter_length = min(512, max(1, r.shape[-1] // 4))
    sdr_db = fast_bss_eval.bss_eval_sources(r, e, filter_length=filter_length,
                                            compute_permutation=False, clamp_db=300)[0]
    return sdr_db.numpy()


def separation_metrics(mix: torch.Tensor, est: torch.Tensor, ref: torch.Tensor,
                       with_sdr: bool = True):
    """Metrics of one separated utterance.

    ``mix [time]``, ``est [time, S]``, ``ref [time, S]``. Estimates are matched to references
    by the permutation that maximises SI-SNR; improvements are relative to using the mixture as
    the estimate of every source. Returns ``(metrics dict, est reordered [time, S])``.
    """
    score, perm = pit_si_snr(est.unsqueeze(0).float(), ref.unsqueeze(0).float())
    est = reorder(est.unsqueeze(0), perm)[0]
    mix_rep = mix.unsqueeze(-1).expand_as(ref)
    base = si_snr(mix_rep.T.float(), ref.T.float()).mean()
    out = {"si-snr": float(score[0]), "si-snr_i": float(score[0] - base)}
    if with_sdr:
        s = sdr(est, ref)
        s0 = sdr(mix_rep, ref)
        out["sdr"] = float(s.mean())
        out["sdr_i"] = float((s - s0).mean())
    return out, est
