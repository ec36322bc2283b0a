"""Pretrained interfaces. :class:`Separator` serves every separation model of the project.

Usage::

    from modules.inference import Separator
    sep = Separator.from_hparams(source="<local folder or HF repo id>", savedir="pretrained/x")
    est = sep.separate_file("mixture.wav", output_dir="out/")   # [1, time, n_src]
    est = sep.separate_batch(mix)                               # [batch, time] -> [batch, time, n_src]

The folder holds ``hyperparams.yaml`` (``model``, ``modules``, ``pretrainer``, ``sample_rate``;
see ``hparams/``) and the weights that its pretrainer names (``model.ckpt``).

Long input is separated in overlapping chunks (``chunk_seconds``, ``overlap_seconds``; the
hyperparams may set them). The sources of each chunk are put in the order that best matches the
previous chunk on their overlap (SI-SNR, the same assignment as PIT), then cross-faded linearly,
so a speaker stays on the same output channel through the file, and the model only ever sees one
chunk at a time.
"""

from __future__ import annotations

import logging
import os

import torch
from speechbrain.inference.interfaces import Pretrained

from .audio import (AudioError, check_finite, clipped_fraction, match_level, read_audio, resample,
                    wav_truncation, write_audio)
from .losses import best_permutation, pairwise_si_snr, reorder

logger = logging.getLogger(__name__)


def chunked_separation(model, mix: torch.Tensor, chunk: int, overlap: int) -> torch.Tensor:
    """Separate ``mix [batch, time]`` chunk by chunk. Returns ``[batch, time, n_src]``.

    Chunks of ``chunk`` samples start every ``chunk - overlap`` samples. Chunk k's sources are
    permuted to best match chunk k-1 on their ``overlap`` common samples, then the two are
    cross-faded there. Memory for the model is bounded by the chunk, not the input length.
    """
    if not 0 <= overlap < chunk:
        raise ValueError(f"need 0 <= overlap ({overlap}) < chunk ({chunk})")
    b, t = mix.shape
    hop = chunk - overlap
    out, prev_tail = None, None
    for start in range(0, max(t - overlap, 1), hop):
        end = min(start + chunk, t)
        est = model(mix[:, start:end])
        if out is None:
            out = est.new_zeros(b, t, est.shape[-1])
        ov = min(overlap, end - start) if prev_tail is not None else 0
        if ov:
            perm = best_permutation(pairwise_si_snr(est[:, :ov], prev_tail[:, :ov]))
            est = reorder(est, perm)
            ramp = torch.linspace(0, 1, ov + 2, device=est.device, dtype=est.dtype)[1:-1]
            ramp = ramp.view(1, ov, 1)
            out[:, start:start + ov] = prev_tail[:, :ov] * (1 - ramp) + est[:, :ov] * ramp
        out[:, start + ov:end] = est[:, ov:]
        prev_tail = est[:, -overlap:] if overlap else None
        if end == t:
            break
    return out


class Separator(Pretrained):
    """Speech separation from a pretrained folder (see the module docstring).

    Hyperparams read: ``sample_rate``; optional ``chunk_seconds`` (default 10) and
    ``overlap_seconds`` (default 2).
    """

    HPARAMS_NEEDED = ["sample_rate"]
    MODULES_NEEDED = ["model"]

    @property
    def sample_rate(self) -> int:
        return int(self.hparams.sample_rate)

    @property
    def min_samples(self) -> int:
        """Shortest input the model can separate: one frame of its encoder."""
        enc = getattr(self.mods.model, "encoder", None)
        return int(getattr(enc, "kernel_size", None) or getattr(enc, "n_fft", None) or 1)

    def _chunking(self):
        sr = self.sample_rate
        chunk = int(getattr(self.hparams, "chunk_seconds", 10.0) * sr)
        overlap = int(getattr(self.hparams, "overlap_seconds", 2.0) * sr)
        return chunk, overlap

    @torch.no_grad()
    def separate_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """``mix [batch, time]`` at ``sample_rate`` -> estimates ``[batch, time, n_src]``."""
        if mix.dim() == 1:
            mix = mix.unsqueeze(0)
        if mix.dim() != 2:
            raise AudioError(f"expected a mixture [batch, time], got shape {tuple(mix.shape)}; "
                             "down-mix or pick a channel first (separate_file does both)")
        mix = mix.to(self.device).float()
        check_finite(mix, "mixture")
        if mix.shape[-1] < self.min_samples:
            raise AudioError(
                f"the mixture has {mix.shape[-1]} samples, shorter than one encoder frame "
                f"({self.min_samples} samples = {1000 * self.min_samples / self.sample_rate:.1f} "
                f"ms at {self.sample_rate} Hz); there is nothing to separate")
        chunk, overlap = self._chunking()
        model = self.mods.model
        if mix.shape[-1] <= chunk:
            return model(mix)
        return chunked_separation(model, mix, chunk, overlap)

    def separate_file(self, path, output_dir=None, channel=None, resample_output=False):
        """Separate an audio file. Returns ``[1, time, n_src]`` at ``sample_rate`` (or at the
        file's rate with ``resample_output=True``).

        Multi-channel files are down-mixed with a warning unless ``channel`` picks one. With
        ``output_dir``, writes ``<name>_source<k>.wav`` per source at the mixture's level,
        never clipped.
        """
        x, sr = read_audio(path, mono=False)  # [time, channels]
        if x.shape[0] == 0:
            raise AudioError(f"{path}: the file holds no samples; nothing to separate")
        cut = wav_truncation(str(path))
        if cut:
            logger.warning("%s is truncated: its header announces %d bytes of audio, %d are "
                           "present; separating the %.2f s that are there", path, cut[0], cut[1],
                           x.shape[0] / sr)
        clipped = clipped_fraction(x)
        if clipped > 1e-3:
            logger.warning("%s looks clipped (%.1f%% of samples at full scale); separating it, "
                           "but expect distortion in every source", path, 100 * clipped)
        if x.shape[1] > 1:
            if channel is None:
                logger.warning("%s has %d channels: separating their average (pass channel=k "
                               "to separate one channel)", path, x.shape[1])
                x = x.mean(1)
            elif not 0 <= channel < x.shape[1]:
                raise AudioError(f"{path}: channel {channel} asked but the file has "
                                 f"{x.shape[1]} channels (0..{x.shape[1] - 1})")
            else:
                x = x[:, channel]
        else:
            x = x[:, 0]
        check_finite(x, str(path))
        if x.abs().max() == 0:
            logger.warning("%s is silent: every separated source is silent", path)
        mix = resample(x, sr, self.sample_rate)
        try:
            est = self.separate_batch(mix.unsqueeze(0))[0].cpu()
        except AudioError as err:
            raise AudioError(f"{path}: {err}") from err
        out_sr = self.sample_rate
        if resample_output and sr != self.sample_rate:
            est = resample(est.T, self.sample_rate, sr).T
            mix, out_sr = x, sr
        if output_dir is not None:
            stem = os.path.splitext(os.path.basename(str(path)))[0]
            scaled = match_level(est, mix[: est.shape[0]])
            for k in range(est.shape[1]):
                write_audio(os.path.join(output_dir, f"{stem}_source{k + 1}.wav"), scaled[:, k], out_sr)
        return est.unsqueeze(0)
