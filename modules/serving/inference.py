"""Pretrained interfaces. :class:`Separator` serves every separation model of the project.

Usage::

    from modules.serving.inference import Separator
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

import contextlib
import importlib
import itertools
import logging
import os
import re

import pretty_midi
import torch
from torch import nn
from huggingface_hub import file_exists
from speechbrain.inference.interfaces import Pretrained
from speechbrain.utils.fetching import fetch
from speechbrain.utils.parameter_transfer import Pretrainer

from modules.serving import cards
from modules.data.audio import (AudioError, check_finite, clipped_fraction, match_level, read_audio, resample,
                    wav_truncation, write_audio)
from modules.models.clustering import cluster_units
from modules.models.losses import best_permutation, pairwise_si_snr, reorder
from modules.models.speaker import GE2EEncoder
from modules.models.timbre import plot_example, roll_to_notes
from modules.training.brain import load_weights
from modules.training.memory import reuse_freed_memory

logger = logging.getLogger(__name__)

#: settings every interface reads from its hyperparams (defaults here), ``overrides=`` and the
#: instance; an exported ``hyperparams.yaml`` writes them out
INFERENCE_SETTINGS = {"chunk_seconds": 10.0, "overlap_seconds": 2.0, "precision": "fp32",
                      "reuse_freed_memory": False, "speaker_tracking": "global"}
#: packages whose objects a model folder's yaml may build without ``trust_code=True``
TRUSTED_PACKAGES = ("modules", "speechbrain", "torch", "torchaudio")
_YAML_TARGET = re.compile(r"!(new|name|apply|module|include):\s*([^\s]+)")


class UntrustedModelError(PermissionError):
    """A model folder's yaml names code outside :data:`TRUSTED_PACKAGES`."""


def check_trusted(hparams_path: str, trust_code: bool = False):
    """Refuse a hyperparams file whose ``!new:`` / ``!name:`` / ``!apply:`` / ``!module:`` tags
    name anything outside :data:`TRUSTED_PACKAGES`, or that ``!include:``s another file, unless
    ``trust_code`` is set: loading a yaml runs what it names."""
    with open(hparams_path, encoding="utf-8") as f:
        text = f.read()
    outside = sorted({f"!{tag}:{target}" for tag, target in _YAML_TARGET.findall(text)
                      if tag == "include" or target.split(".")[0] not in TRUSTED_PACKAGES})
    if outside and not trust_code:
        raise UntrustedModelError(
            f"{hparams_path} asks to run code outside {', '.join(TRUSTED_PACKAGES)}: "
            f"{', '.join(outside)}. Loading a model folder runs what its yaml names; if you trust "
            "this folder, pass trust_code=True (command line: --trust_code)")


class WeightsPretrainer(Pretrainer):
    """A ``Pretrainer`` that takes ``<name>.safetensors`` from the folder when it is there,
    ``<name>.ckpt`` otherwise, and loads either with :func:`load_weights`."""

    def collect_files(self, default_source=None, **kwargs):
        if default_source is not None:
            source = str(default_source)
            for name in self.loadables:
                self.custom_hooks.setdefault(name, load_weights)
                if name not in self.paths and _has_file(source, f"{name}.safetensors"):
                    self.paths[name] = f"{source.rstrip('/')}/{name}.safetensors"
        return super().collect_files(default_source=default_source, **kwargs)


def _has_file(source: str, filename: str) -> bool:
    if os.path.isdir(source):
        return os.path.exists(os.path.join(source, filename))
    try:
        return bool(file_exists(source, filename))
    except Exception:  # noqa: BLE001 - offline or not a Hub repo: fall back to the .ckpt
        return False


def check_source(source) -> str:
    """A model ``source`` that looks like a local path must be a folder holding
    ``hyperparams.yaml``; a Hub id is ``user/name``."""
    source = str(source)
    looks_local = (source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1)
                   or os.path.exists(source))
    if looks_local:
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder {source} does not exist (a local folder written by "
                                    "python -m modules.serving.export, or a Hub id user/name)")
        if not os.path.exists(os.path.join(path, "hyperparams.yaml")):
            raise FileNotFoundError(f"{source} holds no hyperparams.yaml: is it a model folder "
                                    "written by python -m modules.serving.export?")
        return os.path.abspath(path)
    return source


SPEAKER_TRACKING = ("global", "overlap")


def chunked_separation(model, mix: torch.Tensor, chunk: int, overlap: int, embed=None,
                       margin: float = 0.1, iterations: int = 10) -> torch.Tensor:
    """Separate ``mix [batch, time]`` chunk by chunk. Returns ``[batch, time, n_src]``.

    Chunks of ``chunk`` samples start every ``chunk - overlap`` samples, and neighbours are
    cross-faded on their ``overlap`` common samples. Which source of a chunk continues which
    output (:func:`assign_chunks`): without ``embed``, each chunk's sources are permuted to
    match the previous chunk on the overlap (a wrong decision carries on to the end); with
    ``embed`` (``signals [n, time] -> speaker embeddings [n, D]``, e.g. a GE2E encoder), every
    chunk is assigned to the file's speakers at once: the speakers start as the sources of the
    chunk whose sources differ the most, each chunk takes the order whose embeddings are closest
    in cosine to them, the speakers become the mean of what was assigned to them, and so on
    until nothing changes (at most ``iterations`` rounds). Where two orders score within
    ``margin`` of the speakers' own distance (1 - their cosine), the overlap decides. Memory for
    the model is bounded by the chunk.
    """
    if not 0 <= overlap < chunk:
        raise ValueError(f"need 0 <= overlap ({overlap}) < chunk ({chunk})")
    b, t = mix.shape
    hop = chunk - overlap
    starts, chunks = [], []
    for start in range(0, max(t - overlap, 1), hop):
        end = min(start + chunk, t)
        starts.append(start)
        chunks.append(model(mix[:, start:end]).float())  # float32 even under a bf16 autocast
        if end == t:
            break
    perms = assign_chunks(chunks, overlap, embed, margin, iterations)
    out = chunks[0].new_zeros(b, t, chunks[0].shape[-1])
    prev_tail = None
    for start, est, perm in zip(starts, chunks, perms):
        est = reorder(est, perm)
        end = start + est.shape[1]
        ov = min(overlap, end - start) if prev_tail is not None else 0
        if ov:
            ramp = torch.linspace(0, 1, ov + 2, device=est.device, dtype=est.dtype)[1:-1].view(1, ov, 1)
            out[:, start:start + ov] = prev_tail[:, :ov] * (1 - ramp) + est[:, :ov] * ramp
        out[:, start + ov:end] = est[:, ov:]
        prev_tail = est[:, -overlap:] if overlap else None
    return out


def assign_chunks(chunks: list, overlap: int, embed=None, margin: float = 0.1,
                  iterations: int = 10) -> list:
    """The permutation of each chunk's sources (``chunks``: ``[batch, time_k, n_src]``, each
    starting ``overlap`` samples before the previous one ends) onto the outputs: a list of
    ``[batch, n_src]`` for :func:`~modules.models.losses.reorder`. See
    :func:`chunked_separation`."""
    b, n_src = chunks[0].shape[0], chunks[0].shape[-1]
    # relative[k][i]: the permutation taking chunk k onto the orientation of chunk k-1 (raw)
    relative = [None]
    for prev, est in zip(chunks, chunks[1:]):
        ov = min(overlap, est.shape[1])  # prev's last `overlap` samples are est's first
        tail = prev[:, prev.shape[1] - overlap:prev.shape[1] - overlap + ov]
        relative.append(best_permutation(pairwise_si_snr(est[:, :ov], tail)) if ov
                        else torch.arange(n_src, device=est.device).expand(b, -1))
    identity = torch.arange(n_src, device=chunks[0].device).expand(b, -1)
    if len(chunks) == 1:
        return [identity]

    def follow(prev_perm, rel):  # chunk k's permutation that continues chunk k-1's
        return torch.gather(rel, 1, prev_perm)

    perms = [identity]
    for rel in relative[1:]:
        perms.append(follow(perms[-1], rel))
    if embed is None or n_src < 2:
        return perms
    # speaker embeddings of every source of every chunk: [chunks, batch, n_src, D]
    emb = torch.stack([nn.functional.normalize(
        embed(est.transpose(1, 2).reshape(b * n_src, -1)).view(b, n_src, -1).float(), dim=-1)
        for est in chunks])
    options = torch.tensor(list(itertools.permutations(range(n_src))), device=emb.device)  # [P, n_src]
    # the speakers start as the sources of the chunk whose sources differ the most
    sim = torch.einsum("kbsd,kbtd->kbst", emb, emb) - 2 * torch.eye(n_src, device=emb.device)
    anchor = sim.amax((-1, -2)).argmin(0)                          # [batch]
    centre = emb[anchor, torch.arange(b, device=emb.device)]       # [batch, n_src, D]
    for _ in range(iterations):
        changed = False
        new = []
        # how far apart the speakers are: 1 - the largest cosine between two of them
        between = torch.einsum("bsd,btd->bst", centre, centre) - 2 * torch.eye(n_src, device=emb.device)
        spread = (1 - between.amax((-1, -2))).clamp_min(1e-6)    # [batch]
        for k in range(len(chunks)):
            # score[b, p] = mean_j cos(emb[k, b, options[p, j]], centre[b, j])
            cos = torch.einsum("bsd,bjd->bsj", emb[k], centre)      # [batch, source, output]
            score = cos[:, options, torch.arange(n_src, device=emb.device)].mean(-1)  # [batch, P]
            top = score.topk(2, dim=-1)
            choice = options[top.indices[:, 0]]
            if k:  # ambiguous chunks continue the previous one through the overlap
                sure = (top.values[:, 0] - top.values[:, 1]) >= margin * spread
                choice = torch.where(sure[:, None], choice, follow(new[-1], relative[k]))
            changed |= not torch.equal(choice, perms[k])
            new.append(choice)
        perms = new
        index = torch.stack(perms)[..., None].expand(-1, -1, -1, emb.shape[-1])
        ordered = torch.gather(emb, 2, index)                      # [chunks, batch, n_src, D]
        centre = nn.functional.normalize(ordered.sum(0), dim=-1)   # [batch, n_src, D]
        if not changed:
            break
    return perms


def interface_class(hparams_path: str, trust_code: bool = False):
    """The Pretrained class that serves a model folder: the yaml's top-level
    ``interface: <module.Class>`` (read as YAML), or :class:`Separator` when there is none. A
    class outside :data:`TRUSTED_PACKAGES` is refused unless ``trust_code``."""
    with open(hparams_path, encoding="utf-8") as f:
        m = re.search(r"^interface:[ \t]*([\w.]+)", f.read(), re.M)
    if not m:
        return Separator
    module, _, name = m.group(1).rpartition(".")
    if module.split(".")[0] not in TRUSTED_PACKAGES and not trust_code:
        raise UntrustedModelError(
            f"{hparams_path} names the interface {m.group(1)}, outside "
            f"{', '.join(TRUSTED_PACKAGES)}; if you trust this folder, pass trust_code=True "
            "(command line: --trust_code)")
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


class AudioInterface(Pretrained):
    """What the three interfaces share: the model's ``sample_rate``, reading files
    (:func:`load_mono`, then resampling), checking input tensors, chunking settings, precision and
    the optional allocator setting around the model call.

    Settings, read from the hyperparams and settable on the instance: ``chunk_seconds`` (default
    10) and ``overlap_seconds`` (2) for long input; ``precision`` (``fp32``, or ``bf16``: the
    model runs under ``torch.autocast`` in bfloat16, outputs are float32), which
    ``run_opts={"precision": ...}`` overrides; ``reuse_freed_memory`` (default False; True runs
    the model inside :func:`modules.training.memory.reuse_freed_memory`).
    """

    HPARAMS_NEEDED = ["sample_rate"]
    MODULES_NEEDED = ["model"]
    PRECISIONS = ("fp32", "bf16")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # sets self.precision: run_opts, else hparams, else fp32
        for key in ("chunk_seconds", "overlap_seconds", "reuse_freed_memory", "speaker_tracking"):
            default = INFERENCE_SETTINGS[key]
            setattr(self, key, type(default)(getattr(self.hparams, key, default)))

    @classmethod
    def from_hparams(cls, source, hparams_file="hyperparams.yaml", overrides=None, trust_code=False,
                     **kwargs):
        """SpeechBrain's ``from_hparams``, with: a clear error for a local folder that does not
        exist; the yaml refused when it names code outside :data:`TRUSTED_PACKAGES` (unless
        ``trust_code``); ``overrides`` of the :data:`INFERENCE_SETTINGS` applied whether or not
        the yaml has those keys."""
        source = check_source(source)
        path = fetch(filename=hparams_file, source=source, savedir=kwargs.get("savedir"),
                     save_filename=None)
        check_trusted(str(path), trust_code)
        overrides = dict(overrides or {})
        settings = {k: overrides.pop(k) for k in list(overrides) if k in INFERENCE_SETTINGS}
        obj = super().from_hparams(source, hparams_file, overrides=overrides, **kwargs)
        for key, value in settings.items():
            setattr(obj, key, type(INFERENCE_SETTINGS[key])(value))
        return obj

    @property
    def sample_rate(self) -> int:
        return int(self.hparams.sample_rate)

    def read(self, path, channel=None):
        """``(signal [time] at sample_rate, signal [time] at the file's rate, file rate)``."""
        x, sr = load_mono(path, channel)
        return resample(x, sr, self.sample_rate), x, sr

    def check_input(self, x: torch.Tensor, what: str, shortest: int, hint: str,
                    shortest_is: str = "the shortest input the model takes") -> torch.Tensor:
        """``[time]`` or ``[batch, time]`` -> float ``[batch, time]`` on the model's device;
        refuses other shapes, NaN/Inf and input shorter than ``shortest`` samples
        (``shortest_is`` names that length in the message)."""
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2:
            raise AudioError(f"expected the {what} as [batch, time], got shape {tuple(x.shape)}; "
                             f"down-mix or pick a channel first ({hint} does both)")
        x = x.to(self.device).float()
        check_finite(x, what)
        if x.shape[-1] < shortest:
            raise AudioError(
                f"the {what} has {x.shape[-1]} samples, shorter than {shortest_is} ({shortest} "
                f"samples = {1000 * shortest / self.sample_rate:.1f} ms at {self.sample_rate} Hz); "
                "there is nothing to process")
        return x

    def chunking(self) -> tuple[int, int]:
        """``(chunk, overlap)`` in samples at ``sample_rate``."""
        chunk = int(self.chunk_seconds * self.sample_rate)
        overlap = int(self.overlap_seconds * self.sample_rate)
        if not 0 <= overlap < chunk:
            raise ValueError(f"need 0 <= overlap_seconds ({self.overlap_seconds}) < chunk_seconds "
                             f"({self.chunk_seconds})")
        return chunk, overlap

    @contextlib.contextmanager
    def model_context(self, device: torch.device):
        """Precision (and the allocator setting, when asked) around a model call."""
        if self.precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {self.PRECISIONS}, got {self.precision!r}")
        with reuse_freed_memory(self.reuse_freed_memory and device.type == "cpu"), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            yield

    @staticmethod
    def output_stem(path) -> str:
        return os.path.splitext(os.path.basename(str(path)))[0]


class Separator(AudioInterface):
    """Speech separation from a pretrained folder (see the module docstring)."""

    model_card = staticmethod(cards.separation_card)

    @property
    def min_samples(self) -> int:
        """Shortest input the model can separate: one frame of its encoder."""
        enc = getattr(self.mods.model, "encoder", None)
        return int(getattr(enc, "kernel_size", None) or getattr(enc, "n_fft", None) or 1)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return self.separate_batch(mix)

    @torch.no_grad()
    def separate_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """``mix [batch, time]`` at ``sample_rate`` -> estimates ``[batch, time, n_src]``."""
        mix = self.check_input(mix, "mixture", self.min_samples, "separate_file",
                               "one encoder frame")
        chunk, overlap = self.chunking()
        with self.model_context(mix.device):
            if mix.shape[-1] <= chunk:
                return self.mods.model(mix).float()
            embed = self.speaker_embedder()
            return chunked_separation(self.mods.model, mix, chunk, overlap, embed)  # float32 already

    def speaker_embedder(self):
        """What assigns chunk outputs to speakers on long input (``speaker_tracking``): a GE2E
        encoder at ``sample_rate`` (built once) for ``global``, None for ``overlap``, or when the
        GE2E weights are not installed (with a warning)."""
        if self.speaker_tracking not in SPEAKER_TRACKING:
            raise ValueError(f"speaker_tracking must be one of {SPEAKER_TRACKING}, got "
                             f"{self.speaker_tracking!r}")
        if self.speaker_tracking == "overlap":
            return None
        if getattr(self, "_ge2e", None) is None:
            try:
                self._ge2e = GE2EEncoder(sample_rate=self.sample_rate).to(self.device).eval()
            except FileNotFoundError as err:
                logger.warning("speaker_tracking='global' falls back to 'overlap': %s", err)
                self.speaker_tracking = "overlap"
                return None
        def embed(signals):
            with torch.autocast(torch.device(self.device).type, enabled=False):
                return self._ge2e(signals.float(), cache=False)
        return embed

    def separate_file(self, path, output_dir=None, channel=None, resample_output=False,
                      savedir=None):
        """Separate an audio file. Returns ``[1, time, n_src]`` at ``sample_rate`` (or at the
        file's rate with ``resample_output=True``).

        Multi-channel files are down-mixed with a warning unless ``channel`` picks one. With
        ``output_dir``, writes ``<name>_source<k>.wav`` per source at the mixture's level,
        never clipped. ``savedir`` is accepted for SpeechBrain's ``separate_file(path,
        savedir=...)`` call and not used: the file is read where it is.
        """
        mix, x, sr = self.read(path, channel)
        try:
            est = self.separate_batch(mix.unsqueeze(0))[0].cpu()
        except AudioError as err:
            raise AudioError(f"{path}: {err}") from err
        out_sr = self.sample_rate
        if resample_output and sr != self.sample_rate:
            est = resample(est.T, self.sample_rate, sr).T
            mix, out_sr = x, sr
        if output_dir is not None:
            stem = self.output_stem(path)
            scaled = match_level(est, mix[: est.shape[0]])
            for k in range(est.shape[1]):
                write_audio(os.path.join(output_dir, f"{stem}_source{k + 1}.wav"), scaled[:, k], out_sr)
        return est.unsqueeze(0)


class TimbreTranscriber(AudioInterface):
    """Transcription per instrument and timbre separation of music (:class:`modules.models.timbre.TimbreNet`).

    ``transcribe_file(path, n_instruments=None, output_dir=None, target=None)`` returns a dict:

    * ``notes``: one list of :class:`modules.data.music.Note` per instrument (cluster);
    * ``rolls``: ``[K, pitches, frames]`` bool piano rolls (MIDI pitch ``min_pitch + row``);
    * ``audio``: ``[time, K]`` the mixture masked per instrument (at ``sample_rate``), or, with
      ``target=k``, ``[time, 2]``: instrument k and the rest;
    * ``n_instruments``: K, given or estimated from the embeddings (silhouette, 2..6).

    With ``output_dir``, writes ``<name>_instrument<k>.mid``/``.wav`` (``target``/``rest`` in
    target mode) and ``<name>_rolls.png``.
    """

    model_card = staticmethod(cards.transcription_card)

    def forward(self, wave: torch.Tensor) -> dict:
        """``wave [batch, time]`` at ``sample_rate`` -> the model's outputs (see TimbreNet)."""
        wave = self.check_input(wave, "recording", self.mods.model.front_end.n_fft, "transcribe_file")
        with torch.no_grad(), self.model_context(wave.device):
            return self.mods.model(wave)

    @torch.no_grad()
    def transcribe_file(self, path, n_instruments=None, output_dir=None, target=None, channel=None,
                        threshold=0.5):
        sr = self.sample_rate
        x, _, _ = self.read(path, channel)
        x = x.to(self.device)
        fe = self.mods.model.front_end
        if x.shape[0] < fe.n_fft:
            raise AudioError(f"{path}: {x.shape[0]} samples at {sr} Hz is shorter than one "
                             f"analysis frame ({fe.n_fft} samples); nothing to transcribe")
        out = {k: v if v.is_complex() else v.float() for k, v in self(x[None]).items()}
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
        os.makedirs(output_dir, exist_ok=True)
        stem = self.output_stem(path)
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


class TargetSpeakerExtractor(AudioInterface):
    """Target-speaker extraction from a pretrained folder (:mod:`modules.models.tse` models and
    :class:`~modules.models.stft_mask.STFTMaskExtractor`).

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

    model_card = staticmethod(cards.extraction_card)

    def _min_samples(self):
        """(mixture, enrolment) shortest lengths, as the model states them."""
        return self.mods.model.min_samples()

    def forward(self, mix: torch.Tensor, enroll: torch.Tensor) -> torch.Tensor:
        return self.extract_batch(mix, enroll)

    @torch.no_grad()
    def extract_batch(self, mix: torch.Tensor, enroll: torch.Tensor, mix_lens=None,
                      enroll_lens=None) -> torch.Tensor:
        """``mix [batch, time]``, ``enroll [batch, time']`` at ``sample_rate`` (relative lengths
        optional, SpeechBrain convention) -> target estimates ``[batch, time]`` (zero beyond each
        mixture's length)."""
        shortest_mix, shortest_enroll = self._min_samples()
        mix = self.check_input(mix, "mixture", shortest_mix, "extract_file")
        enroll = self.check_input(enroll, "enrolment", shortest_enroll, "extract_file")
        if mix.shape[0] != enroll.shape[0]:
            raise AudioError(f"{mix.shape[0]} mixtures but {enroll.shape[0]} enrolments; give one "
                             "enrolment per mixture")
        model = self.mods.model
        chunk, overlap = self.chunking()
        with self.model_context(mix.device):
            if mix.shape[-1] <= chunk:
                return model(mix, enroll, mix_lens, enroll_lens).float()

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
        mix, x, sr = self.read(mix_path, channel)
        enroll, _, _ = self.read(enroll_path, channel)
        try:
            est = self.extract_batch(mix[None], enroll[None])[0].cpu()
        except AudioError as err:
            raise AudioError(f"{mix_path} with enrolment {enroll_path}: {err}") from err
        out_sr = self.sample_rate
        if resample_output and sr != self.sample_rate:
            est, mix, out_sr = resample(est, self.sample_rate, sr), x, sr
        if output_dir is not None:
            stem = self.output_stem(mix_path)
            scaled = match_level(est[:, None], mix[: est.shape[0]])[:, 0]
            write_audio(os.path.join(output_dir, f"{stem}_target.wav"), scaled, out_sr)
        return est.unsqueeze(0)
