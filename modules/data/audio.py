"""Audio input/output that never clips and fails with a message that says what to do.

Reading goes through ``soundfile`` (WAV of any sub-type, FLAC, OGG, and MP3 with libsndfile >=
1.1), resampling through ``torchaudio.functional.resample``.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

PEAK = 0.99
#: relative distance from a channel's peak within which a sample counts as at that peak
#: (about three 16-bit steps)
CLIP_TOLERANCE = 1e-4


class AudioError(ValueError):
    """Raised for audio that cannot be used; the message names the file, the problem and a fix."""


def audio_info(path: str):
    """``(frames, sample_rate, channels)`` of an audio file, with a clear error if unreadable."""
    try:
        info = sf.info(str(path))
    except Exception as err:  # soundfile raises several types (RuntimeError, LibsndfileError)
        raise AudioError(f"{path}: cannot read audio ({err}); check that the file exists and is "
                         "a complete WAV/FLAC/OGG/MP3 file") from err
    return info.frames, info.samplerate, info.channels


def read_audio(path: str, start: int = 0, stop: int | None = None, mono: bool = True):
    """Read ``path[start:stop]`` as float32. Returns ``(tensor, sample_rate)``.

    The tensor is ``[time]`` when ``mono`` (channels averaged) else ``[time, channels]``.
    """
    try:
        data, sr = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(f"{path}: cannot read audio ({err}); check that the file exists and is "
                         "a complete WAV/FLAC/OGG/MP3 file") from err
    x = torch.from_numpy(data)
    if mono:
        x = x.mean(1)
    return x, sr


def wav_truncation(path: str):
    """``(declared, present)`` bytes of audio data when a WAV file is shorter than its header
    says (an interrupted copy or download), else None. libsndfile reads such a file without a
    word, so callers warn with this."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                n = int.from_bytes(chunk[4:], "little")
                if chunk[:4] == b"data":
                    present = size - f.tell()
                    return (n, present) if n != 0xFFFFFFFF and n > present else None
                f.seek(n + (n & 1), 1)
    except OSError:
        return None


def clipped_fraction(x: torch.Tensor) -> float:
    """Fraction of samples on a clipped plateau: runs of two or more consecutive samples within
    :data:`CLIP_TOLERANCE` (relative) of a channel's positive peak, or of its negative peak.
    Every sample of such a run counts. This is the mark of clipping at any full scale
    (16/24-bit or float, symmetric or not), which a smooth waveform, however loud, leaves on a
    few samples at most. ``x [time]`` or ``[time, channels]``."""
    if x.shape[0] < 2:
        return 0.0
    x = x.reshape(x.shape[0], -1)
    hi, lo = x.max(0).values, x.min(0).values
    near_hi = (hi > 0) & (x >= hi * (1 - CLIP_TOLERANCE))
    near_lo = (lo < 0) & (x <= lo * (1 - CLIP_TOLERANCE))
    return float((_in_runs(near_hi) | _in_runs(near_lo)).float().mean())


def _in_runs(mask: torch.Tensor) -> torch.Tensor:
    """``mask [time, channels]`` -> True where the sample and a neighbour in time are True."""
    neighbour = torch.zeros_like(mask)
    neighbour[1:] |= mask[:-1]
    neighbour[:-1] |= mask[1:]
    return mask & neighbour


def resample(x: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample the last dimension from ``orig_sr`` to ``new_sr`` (integers, any ratio)."""
    if orig_sr == new_sr:
        return x
    g = math.gcd(int(orig_sr), int(new_sr))
    return AF.resample(x, int(orig_sr) // g, int(new_sr) // g)


def check_finite(x: torch.Tensor, what: str):
    if not torch.isfinite(x).all():
        n = int((~torch.isfinite(x)).sum())
        raise AudioError(f"{what}: {n} NaN/Inf samples; repair or drop the file "
                         "(e.g. replace them with zeros) before separating it")


def match_level(est: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Rescale each estimated source to the level it has in the mixture.

    A network trained with SI-SNR has an arbitrary output scale. Each source ``est[:, j]`` is
    multiplied by the least-squares gain that best explains the mixture with it,
    ``g_j = <est_j, mix> / ||est_j||^2``. ``est [time, S]``, ``mix [time]`` -> ``[time, S]``.
    """
    num = (est * mix.unsqueeze(-1)).sum(0)
    den = est.pow(2).sum(0).clamp_min(1e-12)
    return est * (num / den)


def write_audio(path: str, x: torch.Tensor, sample_rate: int, subtype: str = "PCM_16") -> float:
    """Write ``x [time]`` or ``[time, channels]`` without clipping.

    If the peak exceeds 0.99 the signal is scaled down to 0.99 before quantisation. Returns the
    gain that was applied (1.0 when none was needed).
    """
    x = torch.as_tensor(x).detach().float().cpu()
    check_finite(x, str(path))
    peak = float(x.abs().max()) if x.numel() else 0.0
    gain = PEAK / peak if peak > PEAK else 1.0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(str(path), (x * gain).numpy(), int(sample_rate), subtype=subtype)
    return gain


@lru_cache(maxsize=8)
def _window(n_fft: int):
    return torch.hann_window(n_fft)


def plot_separation(path: str, mix, estimates, references=None, sample_rate=8000, title=None):
    """Save a picture of log spectrograms: mixture, each estimate and each reference.

    ``mix [time]``, ``estimates [time, S]``, ``references [time, S]`` or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("mixture", mix)]
    rows += [(f"estimate {j + 1}", estimates[:, j]) for j in range(estimates.shape[1])]
    if references is not None:
        rows += [(f"reference {j + 1}", references[:, j]) for j in range(references.shape[1])]
    n_fft = 512 if sample_rate > 8000 else 256
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.6 * len(rows)), sharex=True)
    for ax, (name, sig) in zip(np.atleast_1d(axes), rows):
        sig = torch.as_tensor(sig).float().cpu()
        spec = torch.stft(sig, n_fft, n_fft // 4, window=_window(n_fft), return_complex=True).abs()
        db = 20 * torch.log10(spec + 1e-6)
        vmax = float(db.max())
        ax.imshow(db.numpy(), origin="lower", aspect="auto", vmin=vmax - 80, vmax=vmax,
                  extent=(0, len(sig) / sample_rate, 0, sample_rate / 2000), cmap="magma")
        ax.set_ylabel("kHz")
        ax.set_title(name, fontsize=9, loc="left")
    np.atleast_1d(axes)[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
