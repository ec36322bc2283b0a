"""Separation metrics for one utterance: SI-SNR, SI-SNRi, SDR, SDRi.

SDR is BSS-Eval's (Vincent et al., 2006) with a 512-tap distortion filter, computed by
``fast_bss_eval`` (Scheibler, 2022), which matches ``mir_eval.separation.bss_eval_sources``.
Metrics are always computed on the unclipped float signals.
"""

from __future__ import annotations

import numpy as np
import torch

from modules.models.losses import pit_si_snr, reorder, si_snr

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


SPEAKER_VERDICTS = ("correct", "ambiguous", "confused")


def speaker_verdicts(est_emb: torch.Tensor, target_emb: torch.Tensor, interferer_emb: torch.Tensor,
                     margin: float = 0.05) -> list[str]:
    """Speaker-similarity verdict of each extracted estimate.

    ``est_emb [batch, D]`` (speaker embeddings of the estimates), ``target_emb [batch, D]`` (of
    the target's enrolment), ``interferer_emb [batch, D]`` or ``[batch, K, D]`` (of the
    interferers; the closest one counts). With cosines ``c_t = cos(est, target)`` and
    ``c_i = cos(est, interferer)``: ``confused`` when ``c_i > c_t + margin``, ``correct`` when
    ``c_t > c_i + margin``, ``ambiguous`` in between.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    est = torch.nn.functional.normalize(est_emb.detach().float(), dim=-1)
    tgt = torch.nn.functional.normalize(target_emb.detach().float(), dim=-1)
    itf = torch.nn.functional.normalize(interferer_emb.detach().float(), dim=-1)
    if itf.dim() == est.dim():
        itf = itf.unsqueeze(-2)
    if est.shape != tgt.shape or itf.shape[0] != est.shape[0] or itf.shape[-1] != est.shape[-1]:
        raise ValueError(f"expected est and target embeddings [batch, D] and interferers [batch, D] "
                         f"or [batch, K, D]; got {tuple(est_emb.shape)}, {tuple(target_emb.shape)}, "
                         f"{tuple(interferer_emb.shape)}")
    c_t = (est * tgt).sum(-1)
    c_i = (est.unsqueeze(-2) * itf).sum(-1).amax(-1)
    return ["confused" if i > t + margin else "correct" if t > i + margin else "ambiguous"
            for t, i in zip(c_t.tolist(), c_i.tolist())]


def speaker_verdict_shares(est_emb: torch.Tensor, target_emb: torch.Tensor,
                           interferer_emb: torch.Tensor, margin: float = 0.05) -> dict[str, float]:
    """Share of each verdict of :func:`speaker_verdicts` (``correct``, ``ambiguous``,
    ``confused``; they sum to 1)."""
    verdicts = speaker_verdicts(est_emb, target_emb, interferer_emb, margin)
    return {v: verdicts.count(v) / max(len(verdicts), 1) for v in SPEAKER_VERDICTS}
