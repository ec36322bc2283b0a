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
from .memory import reuse_freed_memory

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
        est = model(mix[:, start:end]).float()  # float32 even under a bf16 autocast
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


def interface_class(hparams_path: str):
    """The Pretrained class that serves a model folder: the yaml's top-level
    ``interface: <module.Class>`` line, or :class:`Separator` when there is none."""
    import importlib
    import re

    with open(hparams_path) as f:
        m = re.search(r"^interface:[ \t]*([\w.]+)", f.read(), re.M)
    if not m:
        return Separator
    module, _, name = m.group(1).rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_mono(path, channel=None):
    """Read an audio file for a model: ``(signal [time], sample_rate)``. Refuses empty, unreadable
    and NaN/Inf files (AudioError naming the file); warns about truncated WAVs, clipping and
    silence; averages the channels of a multi-channel file with a warning unless ``channel``
    picks one."""
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
    return x, sr


class Separator(Pretrained):
    """Speech separation from a pretrained folder (see the module docstring).

    Hyperparams read: ``sample_rate``; optional ``chunk_seconds`` (default 10),
    ``overlap_seconds`` (default 2) and ``precision`` (``fp32``, the default, or ``bf16``: the
    model runs under ``torch.autocast`` in bfloat16, matrix products and convolutions in bf16,
    outputs returned in float32; MossFormer2 is 1.3-1.4x faster than in fp32 on a CPU with
    AVX512-BF16/AMX, 39 dB SNR from the fp32 output, ``bench/mossformer2.py``);
    ``reuse_freed_memory`` (default True: the model runs inside
    :func:`modules.memory.reuse_freed_memory`, so glibc reuses freed memory for new activations
    instead of faulting in fresh pages; the outputs are the same). ``precision`` and
    ``reuse_freed_memory`` can also be set on the instance.
    """

    HPARAMS_NEEDED = ["sample_rate"]
    MODULES_NEEDED = ["model"]
    PRECISIONS = ("fp32", "bf16")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.precision = str(getattr(self.hparams, "precision", "fp32"))
        self.reuse_freed_memory = bool(getattr(self.hparams, "reuse_freed_memory", True))

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
        if self.precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {self.PRECISIONS}, got {self.precision!r}")
        chunk, overlap = self._chunking()
        model = self.mods.model
        with reuse_freed_memory(self.reuse_freed_memory and mix.device.type == "cpu"), \
                torch.autocast(mix.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if mix.shape[-1] <= chunk:
                return model(mix).float()
            return chunked_separation(model, mix, chunk, overlap)  # float32 already

    def separate_file(self, path, output_dir=None, channel=None, resample_output=False):
        """Separate an audio file. Returns ``[1, time, n_src]`` at ``sample_rate`` (or at the
        file's rate with ``resample_output=True``).

        Multi-channel files are down-mixed with a warning unless ``channel`` picks one. With
        ``output_dir``, writes ``<name>_source<k>.wav`` per source at the mixture's level,
        never clipped.
        """
        x, sr = load_mono(path, channel)
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


class TimbreTranscriber(Pretrained):
    """Transcription per instrument and timbre separation of music (:class:`modules.timbre.TimbreNet`).

    ``transcribe_file(path, n_instruments=None, output_dir=None, target=None)`` returns a dict:

    * ``notes``: one list of :class:`modules.music.Note` per instrument (cluster);
    * ``rolls``: ``[K, pitches, frames]`` bool piano rolls (MIDI pitch ``min_pitch + row``);
    * ``audio``: ``[time, K]`` the mixture masked per instrument (at ``sample_rate``), or, with
      ``target=k``, ``[time, 2]``: instrument k and the rest;
    * ``n_instruments``: K, given or estimated from the embeddings (silhouette, 2..6).

    With ``output_dir``, writes ``<name>_instrument<k>.mid``/``.wav`` (``target``/``rest`` in
    target mode) and ``<name>_rolls.png``.
    """

    HPARAMS_NEEDED = ["sample_rate"]
    MODULES_NEEDED = ["model"]

    @torch.no_grad()
    def transcribe_file(self, path, n_instruments=None, output_dir=None, target=None, channel=None,
                        threshold=0.5):
        from .clustering import cluster_units
        from .timbre import roll_to_notes

        sr = int(self.hparams.sample_rate)
        x, file_sr = load_mono(path, channel)
        x = resample(x, file_sr, sr).to(self.device)
        model = self.mods.model
        fe = model.front_end
        if x.shape[0] < fe.n_fft:
            raise AudioError(f"{path}: {x.shape[0]} samples at {sr} Hz is shorter than one "
                             f"analysis frame ({fe.n_fft} samples); nothing to transcribe")
        out = model(x[None])
        roll = torch.sigmoid(out["note_logits"][0]) > threshold
        onsets = torch.sigmoid(out["onset_logits"][0]) > threshold
        level = 20 * torch.log10(out["units"][0].abs() + 1e-8)
        active = level > level.max() - 40
        units = roll | active
        emb = out["embeddings"][0].flatten(1).T
        labels = cluster_units(emb, units.flatten(), k=n_instruments).view(roll.shape)
        k = int(labels.max()) + 1 if (labels >= 0).any() else 0
        hop_s = fe.hop_length / sr
        rolls = torch.stack([roll & (labels == c) for c in range(k)]) if k else roll[None] & False
        notes = [roll_to_notes(r, hop_s, fe.min_pitch, onsets=onsets) for r in rolls]
        audio = self._masked_audio(x, labels, k, units)
        if target is not None:
            if not 0 <= target < k:
                raise ValueError(f"target={target} but {k} instruments were found (0..{k - 1})")
            audio = torch.stack([audio[:, target], audio.sum(1) - audio[:, target]], 1)
        result = {"notes": notes, "rolls": rolls.cpu(), "audio": audio.cpu(), "n_instruments": k}
        if output_dir is not None:
            self._write(path, output_dir, result, target, sr, out["units"][0].cpu(), fe)
        return result

    def _masked_audio(self, x, labels, k, units):
        """Unit labels -> per-instrument soft masks on the STFT bins (each bin averages the
        masks of the semitone units covering it; inactive units are shared equally) -> iSTFT."""
        fe = self.mods.model.front_end
        masks = torch.stack([(labels == c).float() for c in range(k)]) if k else labels[None].float() * 0
        masks = torch.where(units[None], masks, torch.full_like(masks, 1.0 / max(k, 1)))
        weight = fe.fbank.sum(0).clamp_min(1e-8)                           # [F]
        stft_masks = torch.einsum("pf,kpt->kft", fe.fbank, masks) / weight[None, :, None]
        uncovered = fe.fbank.sum(0) < 1e-6                                 # bins no pitch covers
        stft_masks[:, uncovered] = 1.0 / max(k, 1)
        spec = torch.stft(x, fe.n_fft, fe.hop_length, window=fe.window, return_complex=True)
        return torch.istft(stft_masks * spec[None], fe.n_fft, fe.hop_length, window=fe.window,
                           length=x.shape[0]).T

    def _write(self, path, output_dir, result, target, sr, units, fe):
        import pretty_midi

        from .timbre import plot_example

        os.makedirs(output_dir, exist_ok=True)
        stem = os.path.splitext(os.path.basename(str(path)))[0]
        names = (["target", "rest"] if target is not None
                 else [f"instrument{k + 1}" for k in range(result["n_instruments"])])
        scaled = match_level(result["audio"], result["audio"].sum(1))
        for k, name in enumerate(names):
            write_audio(os.path.join(output_dir, f"{stem}_{name}.wav"), scaled[:, k], sr)
        for k, notes in enumerate(result["notes"]):
            pm = pretty_midi.PrettyMIDI()
            inst = pretty_midi.Instrument(program=0, name=f"instrument {k + 1}")
            inst.notes = [pretty_midi.Note(velocity=90, pitch=n.pitch, start=n.onset, end=n.offset)
                          for n in notes]
            pm.instruments.append(inst)
            pm.write(os.path.join(output_dir, f"{stem}_instrument{k + 1}.mid"))
        k = result["n_instruments"]
        labels = torch.full(result["rolls"].shape[1:], -1)
        for c in range(k):
            labels[result["rolls"][c]] = c
        plot_example(os.path.join(output_dir, f"{stem}_rolls.png"), units, None, labels,
                     result["rolls"].any(0),
                     {c: c for c in range(k)}, [f"cluster {c + 1}" for c in range(k)], fe,
                     title=f"{stem}: estimated notes per instrument (top: mixture)")


class TargetSpeakerExtractor(Pretrained):
    """Target-speaker extraction from a pretrained folder (:mod:`modules.tse` models).

    Usage::

        tse = TargetSpeakerExtractor.from_hparams(source="<folder or HF id>", savedir="pretrained/x")
        est = tse.extract_file("mixture.wav", "enrollment.wav", output_dir="out/")  # [1, time]
        est = tse.extract_batch(mix, enroll, mix_lens, enroll_lens)              # [batch, time]

    Files are read as :meth:`Separator.separate_file` reads them (:func:`load_mono`: channel
    average or ``channel``, truncation/clipping warnings) and resampled to ``sample_rate``. A
    mixture longer than ``chunk_seconds`` (default 10) is extracted in chunks overlapping by
    ``overlap_seconds`` (2), each with the same enrolment, cross-faded on the overlaps
    (:func:`chunked_separation` with one source).
    """

    HPARAMS_NEEDED = ["sample_rate"]
    MODULES_NEEDED = ["model"]

    @property
    def sample_rate(self) -> int:
        return int(self.hparams.sample_rate)

    def _min_samples(self):
        """(mixture, enrolment) shortest lengths: one encoder frame and one WavLM frame."""
        from .tse import receptive_field_samples

        model = self.mods.model
        cfg = model.wavlm.config
        wavlm = receptive_field_samples(cfg.conv_kernel, cfg.conv_stride)
        return max(model.encoder.kernel_size, wavlm), wavlm

    def _check(self, x: torch.Tensor, what: str, shortest: int) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2:
            raise AudioError(f"expected the {what} as [batch, time], got shape {tuple(x.shape)}; "
                             "down-mix or pick a channel first (extract_file does both)")
        x = x.to(self.device).float()
        check_finite(x, what)
        if x.shape[-1] < shortest:
            raise AudioError(f"the {what} has {x.shape[-1]} samples, fewer than the model needs "
                             f"({shortest} samples = {1000 * shortest / self.sample_rate:.1f} ms at "
                             f"{self.sample_rate} Hz)")
        return x

    @torch.no_grad()
    def extract_batch(self, mix: torch.Tensor, enroll: torch.Tensor, mix_lens=None,
                      enroll_lens=None) -> torch.Tensor:
        """``mix [batch, time]``, ``enroll [batch, time']`` at ``sample_rate`` (relative lengths
        optional, SpeechBrain convention) -> target estimates ``[batch, time]`` (zero beyond each
        mixture's length)."""
        shortest_mix, shortest_enroll = self._min_samples()
        mix = self._check(mix, "mixture", shortest_mix)
        enroll = self._check(enroll, "enrolment", shortest_enroll)
        if mix.shape[0] != enroll.shape[0]:
            raise AudioError(f"{mix.shape[0]} mixtures but {enroll.shape[0]} enrolments; give one "
                             "enrolment per mixture")
        model = self.mods.model
        chunk = int(getattr(self.hparams, "chunk_seconds", 10.0) * self.sample_rate)
        overlap = int(getattr(self.hparams, "overlap_seconds", 2.0) * self.sample_rate)
        if mix.shape[-1] <= chunk:
            return model(mix, enroll, mix_lens, enroll_lens)

        def one_chunk(part):  # the same enrolment for every chunk; [batch, time, 1]
            return model(part, enroll, None, enroll_lens)[..., None]

        est = chunked_separation(one_chunk, mix, chunk, overlap)[..., 0]
        if mix_lens is not None:
            real = torch.arange(mix.shape[-1], device=mix.device)[None, :]
            est = est * (real < torch.round(torch.as_tensor(mix_lens, device=mix.device) *
                                            mix.shape[-1])[:, None])
        return est

    def extract_file(self, mix_path, enroll_path, output_dir=None, channel=None,
                     resample_output=False) -> torch.Tensor:
        """Extract the enrolment's speaker from a mixture file. Returns ``[1, time]`` at
        ``sample_rate`` (or at the mixture file's rate with ``resample_output=True``). With
        ``output_dir``, writes ``<mixture name>_target.wav`` at the mixture's level."""
        x, sr = load_mono(mix_path, channel)
        e, enroll_sr = load_mono(enroll_path, channel)
        mix = resample(x, sr, self.sample_rate)
        enroll = resample(e, enroll_sr, self.sample_rate)
        try:
            est = self.extract_batch(mix[None], enroll[None])[0].cpu()
        except AudioError as err:
            raise AudioError(f"{mix_path} with enrolment {enroll_path}: {err}") from err
        out_sr = self.sample_rate
        if resample_output and sr != self.sample_rate:
            est, mix, out_sr = resample(est, self.sample_rate, sr), x, sr
        if output_dir is not None:
            stem = os.path.splitext(os.path.basename(str(mix_path)))[0]
            scaled = match_level(est[:, None], mix[: est.shape[0]])[:, 0]
            write_audio(os.path.join(output_dir, f"{stem}_target.wav"), scaled, out_sr)
        return est.unsqueeze(0)
