"""GE2E d-vector speaker encoder (Wan et al., "Generalized End-to-End Loss for Speaker
Verification", ICASSP 2018), with the pretrained weights that PyPI ``resemblyzer==0.1.4``
(Apache-2.0) ships as ``resemblyzer/pretrained.pt``.

Network (``resemblyzer/voice_encoder.py``, ``VoiceEncoder.__init__`` / ``forward``): a 3-layer
LSTM 40 -> 256 over a partial utterance of 160 mel frames; its last layer's final hidden state
-> Linear 256 -> 256 -> ReLU -> L2 norm.

Front end, written here in torch/torchaudio only (the package's own needs librosa and
webrtcvad). Facts read from the package:

* ``resemblyzer/hparams.py``: 16 kHz, 40 mel bands, 25 ms window (400 samples), 10 ms hop
  (160), partials of 160 frames (1.6 s), volume target -30 dBFS.
* ``resemblyzer/audio.py``, ``wav_to_mel_spectrogram``: ``librosa.feature.melspectrogram`` with
  its defaults, i.e. a periodic Hann window of ``n_fft`` = 400, centred frames padded with zeros
  (librosa >= 0.10), power 2, Slaney mel scale with Slaney area normalisation, 0..8 kHz; the
  mel power is used as it is (no logarithm).
* ``resemblyzer/audio.py``, ``normalize_volume`` (called by ``preprocess_wav`` with
  ``increase_only=True``): quieter input is scaled up to an RMS of -30 dBFS, louder input is
  left as it is. The mel power is not compressed by a logarithm, so the embedding depends on
  the input level, and an estimate at another level than its enrolment drifts away from it.
  :class:`GE2EEncoder` therefore scales every input to the same RMS by default
  (``volume="fixed"``, -25 dBFS: inside the range that the package passes through unchanged);
  ``volume="increase", target_dbfs=-30`` is the package's own rule.
* ``resemblyzer/audio.py``, ``trim_long_silences`` (with ``hparams.py``'s ``vad_*``): after the
  volume, ``preprocess_wav`` cuts silences: webrtcvad (mode 3) flags 30-ms windows, the flags are
  smoothed by a moving average over 8 windows and rounded, dilated by a 7-window structure, and
  the unflagged samples dropped. webrtcvad is not reproduced; :func:`trim_long_silences` here
  keeps the windows, smoothing and dilation with an energy detector, and is off by default: the
  whole (level-normalised) signal is embedded.
* ``resemblyzer/audio.py``, ``preprocess_wav``: other rates are resampled to 16 kHz with
  ``librosa.resample`` (soxr, high quality); here a Kaiser-windowed sinc of 64 zero crossings
  with roll-off 0.9476 (the parameters of librosa's former ``kaiser_best``), which agrees with it
  closely.
* ``resemblyzer/voice_encoder.py``, ``compute_partial_slices`` / ``embed_utterance``: partials
  start every ``round(16000 / rate / 160)`` frames (``rate`` = 1.3 per second: 77 frames, so
  consecutive partials overlap by 83 frames), over ``n // 160 + 1`` frames for ``n`` samples;
  the last partial is dropped when it covers less than ``min_coverage`` (0.75) of its 1.6 s
  with real samples, unless it is the only one; the signal is zero-padded to the end of the
  last partial; the utterance embedding is the L2-normalised mean of the partial embeddings.

Usage::

    enc = GE2EEncoder(sample_rate=8000)   # input at 8 kHz is resampled to 16 kHz inside
    emb = enc(wav, lengths)               # wav [batch, time], relative lengths -> [batch, 256]
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from collections import OrderedDict

import torch
import torchaudio.functional as AF
from torch import nn

from modules.data.audio import AudioError

#: the GE2E model's own rate and front end (``resemblyzer/hparams.py``)
GE2E_SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 40
GE2E_DIM = 256
PARTIAL_FRAMES = 160
VOLUME_MODES = ("fixed", "increase", "none")
#: window of the silence detector (``vad_window_length`` = 30 ms)
VAD_WINDOW = 480
INSTALL_HINT = ".venv/bin/pip install --no-deps resemblyzer==0.1.4"
#: band-limited resampling to 16 kHz (librosa's former ``kaiser_best`` settings)
KAISER_BEST = dict(lowpass_filter_width=64, rolloff=0.9475937167399596,
                   resampling_method="sinc_interp_kaiser", beta=14.769656459379492)


def resemblyzer_weights() -> str:
    """Path of ``resemblyzer/pretrained.pt``, found without importing the package (its
    ``__init__`` imports librosa and webrtcvad). Raises FileNotFoundError naming the install
    command when the package or the file is missing."""
    spec = importlib.util.find_spec("resemblyzer")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, "pretrained.pt")
        if os.path.isfile(path):
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise FileNotFoundError(
        f"GE2E speaker-encoder weights resemblyzer/pretrained.pt not found{where}; install them "
        f"with `{INSTALL_HINT}`, or pass weights=<path to pretrained.pt>")


def partial_starts(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> list[int]:
    """First mel frame of each 160-frame partial of an ``n_samples``-long utterance, as
    ``compute_partial_slices`` places them (see the module docstring)."""
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    step = int(round(GE2E_SAMPLE_RATE / rate / HOP))
    if not 0 < step <= PARTIAL_FRAMES:
        lowest = GE2E_SAMPLE_RATE / (HOP * PARTIAL_FRAMES)
        raise ValueError(f"rate={rate} partials per second gives a step of {step} frames; it must "
                         f"be between 1 and {PARTIAL_FRAMES} (rate >= {lowest:.3f})")
    n_frames = n_samples // HOP + 1
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    coverage = (n_samples - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < min_coverage and len(starts) > 1:
        starts.pop()
    return starts


def trim_long_silences(wav: torch.Tensor, n: torch.Tensor, threshold_db: float):
    """Cut silences longer than about 0.2 s, as ``trim_long_silences`` does, with an energy
    detector in place of webrtcvad: a 30-ms window is voiced when its energy is within
    ``threshold_db`` of the row's loudest window and not zero. ``wav [batch, time]`` at 16 kHz,
    ``n [batch]`` real samples -> ``(wav, n)``, each row's kept samples moved to its start and
    zeros after them. A row with no voiced window is kept whole."""
    b, t = wav.shape
    windows = t // VAD_WINDOW
    if windows == 0:
        return wav, n
    energy = wav[:, :windows * VAD_WINDOW].reshape(b, windows, VAD_WINDOW).pow(2).mean(-1)
    level = 10 * torch.log10(energy + 1e-20)
    valid = torch.arange(windows, device=wav.device)[None, :] < (n // VAD_WINDOW)[:, None]
    loudest = level.masked_fill(~valid, -torch.inf).amax(-1, keepdim=True)
    flags = ((level > loudest - threshold_db) & (energy > 0) & valid).float()[:, None]
    # moving average over 8 windows (zero padded 3 before, 4 after), rounded half to even:
    # voiced when at least 5 of the 8 are
    count = nn.functional.conv1d(nn.functional.pad(flags, (3, 4)), flags.new_ones(1, 1, 8))
    voiced = (count >= 5).float()
    # dilation by 3 windows on each side (scipy binary_dilation with a 7-wide structure)
    voiced = nn.functional.max_pool1d(voiced, 7, stride=1, padding=3)[:, 0] > 0
    voiced &= valid
    keep = nn.functional.pad(voiced.repeat_interleave(VAD_WINDOW, -1), (0, t - windows * VAD_WINDOW))
    kept = keep.sum(-1)
    empty = kept == 0                       # nothing voiced, or shorter than one window
    keep |= empty[:, None] & (torch.arange(t, device=wav.device)[None, :] < n[:, None])
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    n = torch.where(empty, n, kept)
    real = torch.arange(t, device=wav.device)[None, :] < n[:, None]
    return torch.gather(wav, -1, order) * real, n


def sample_lengths(wav: torch.Tensor, lengths=None) -> torch.Tensor:
    """Relative lengths (SpeechBrain convention, ``None`` = all full) -> samples ``[batch]``."""
    if lengths is None:
        return torch.full((wav.shape[0],), wav.shape[-1], dtype=torch.long, device=wav.device)
    rel = torch.as_tensor(lengths, dtype=torch.float32, device=wav.device).reshape(-1)
    if rel.shape[0] != wav.shape[0] or (rel <= 0).any() or (rel > 1 + 1e-6).any():
        raise ValueError(f"lengths must be {wav.shape[0]} relative lengths in (0, 1], got "
                         f"{rel.tolist()}")
    return torch.round(rel * wav.shape[-1]).long().clamp(1, wav.shape[-1])


class GE2EEncoder(nn.Module):
    """Pretrained GE2E d-vector encoder. ``forward(wav [batch, time], lengths=None, keys=None)``
    -> unit-norm embeddings ``[batch, 256]``.

    Arguments
    ---------
    sample_rate : rate of the input; other than 16 kHz it is resampled to 16 kHz inside.
    weights : path of ``pretrained.pt``; default the one inside the installed resemblyzer.
    freeze : the weights do not train (default). Gradients still reach the input.
    volume, target_dbfs : level normalisation first: ``fixed`` scales every input to an RMS of
        ``target_dbfs``; ``increase`` only scales quieter input up (``preprocess_wav``'s rule,
        with -30); ``none`` leaves the level as it is.
    trim_silence_db : when set, silences longer than about 0.2 s are cut first
        (:func:`trim_long_silences` with this threshold); off by default.
    rate, min_coverage : placement of the partial utterances (``embed_utterance`` defaults).
    cache_size : embeddings kept per enrolment (least recently used dropped); used only while the
        encoder is frozen and the input needs no gradient. 0 turns the cache off.
    """

    def __init__(self, sample_rate: int = GE2E_SAMPLE_RATE, weights: str | None = None,
                 freeze: bool = True, volume: str = "fixed", target_dbfs: float = -25.0,
                 trim_silence_db: float | None = None, rate: float = 1.3,
                 min_coverage: float = 0.75, cache_size: int = 16384):
        super().__init__()
        self.sample_rate = int(sample_rate)
        if volume not in VOLUME_MODES:
            raise ValueError(f"volume must be one of {VOLUME_MODES}, got {volume!r}")
        self.volume, self.target_dbfs = volume, float(target_dbfs)
        self.trim_silence_db = trim_silence_db
        self.rate, self.min_coverage = rate, min_coverage
        partial_starts(PARTIAL_FRAMES * HOP, rate, min_coverage)  # refuse a bad rate now
        self.lstm = nn.LSTM(N_MELS, GE2E_DIM, num_layers=3, batch_first=True)
        self.linear = nn.Linear(GE2E_DIM, GE2E_DIM)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        fbank = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, GE2E_SAMPLE_RATE / 2, N_MELS,
                                   GE2E_SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        self.register_buffer("fbank", fbank, persistent=False)  # [freq, mel]
        self.load_weights(weights or resemblyzer_weights())
        self.freeze = freeze
        if freeze:
            self.requires_grad_(False)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def load_weights(self, path: str):
        """Load ``model_state`` of a resemblyzer checkpoint (its GE2E similarity scale and bias
        are not part of the encoder)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GE2E weights {path} do not exist; install them with "
                                    f"`{INSTALL_HINT}`")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model_state", state)
        own = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
        missing = set(self.state_dict()) - set(own)
        if missing:
            raise ValueError(f"{path} is not a resemblyzer GE2E checkpoint: it lacks "
                             f"{', '.join(sorted(missing))}")
        self.load_state_dict(own)

    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [batch, time]`` at 16 kHz -> mel power ``[batch, frames, 40]``,
        ``frames = time // 160 + 1``."""
        spec = torch.stft(wav, N_FFT, HOP, window=self.window, center=True, pad_mode="constant",
                          return_complex=True)
        return torch.matmul(spec.abs().pow(2).transpose(1, 2), self.fbank)

    def embed_partials(self, mels: torch.Tensor) -> torch.Tensor:
        """``[partials, 160, 40]`` -> unit-norm partial embeddings ``[partials, 256]``."""
        _, (hidden, _) = self.lstm(mels)
        emb = torch.relu(self.linear(hidden[-1]))
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def compute(self, wav: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``wav [batch, time]`` at 16 kHz whose first ``n [batch]`` samples are
        real; no cache."""
        real = torch.arange(wav.shape[-1], device=wav.device)[None, :] < n[:, None]
        wav = wav * real
        if self.volume != "none":
            rms = (wav.pow(2).sum(-1) / n).sqrt()
            gain = 10 ** (self.target_dbfs / 20) / rms.clamp_min(1e-20)
            gain = torch.where(rms > 0, gain, torch.ones_like(rms))   # silence stays silent
            if self.volume == "increase":
                gain = gain.clamp_min(1.0)
            wav = wav * gain[:, None]
        if self.trim_silence_db is not None:
            wav, n = trim_long_silences(wav, n, self.trim_silence_db)
        starts = [partial_starts(int(k), self.rate, self.min_coverage) for k in n.tolist()]
        end = max(s[-1] + PARTIAL_FRAMES for s in starts) * HOP
        if end > wav.shape[-1]:
            wav = nn.functional.pad(wav, (0, end - wav.shape[-1]))
        mel = self.mel(wav)
        item = torch.tensor([b for b, s in enumerate(starts) for _ in s], device=wav.device)
        first = torch.tensor([f for s in starts for f in s], device=wav.device)
        frames = first[:, None] + torch.arange(PARTIAL_FRAMES, device=wav.device)[None, :]
        partial = self.embed_partials(mel[item[:, None], frames])      # [partials, 256]
        total = partial.new_zeros(wav.shape[0], partial.shape[-1]).index_add(0, item, partial)
        return total / total.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, wav: torch.Tensor, lengths=None, keys=None, cache: bool = True) -> torch.Tensor:
        """``wav [batch, time]`` (or ``[time]``) at ``sample_rate``, relative ``lengths``
        optional -> ``[batch, 256]``. ``keys`` (one hashable per row) name the enrolments for
        the cache; without them a row is known by a hash of its samples. ``cache=False`` for
        signals that will not come again (e.g. estimates). Runs in float32 also inside a bf16
        autocast: the pretrained embeddings stay the ones the package computes."""
        with torch.autocast(wav.device.type, enabled=False):
            return self._embed(wav, lengths, keys, cache)

    def _embed(self, wav, lengths, keys, cache):
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2 or wav.shape[-1] == 0:
            raise AudioError(f"GE2EEncoder expects a waveform [batch, time] with samples, got shape "
                             f"{tuple(wav.shape)}")
        if keys is not None and len(keys) != wav.shape[0]:
            raise ValueError(f"{len(keys)} keys for {wav.shape[0]} waveforms; give one per row")
        n = sample_lengths(wav, lengths)
        wav = wav.float()
        use_cache = (cache and self.cache_size > 0 and not any(p.requires_grad for p in self.parameters())
                     and not (wav.requires_grad and torch.is_grad_enabled()))
        if not use_cache:
            return self.compute(*self._at_16k(wav, n))
        if keys is None:  # known by the samples as given: a hit costs no resampling
            keys = [self._content_key(wav[b, :n[b]]) for b in range(wav.shape[0])]
        todo = [b for b, key in enumerate(keys) if key not in self._cache]
        if todo:
            rows = torch.tensor(todo, device=wav.device)
            short = int(n[rows].max())
            with torch.no_grad():
                fresh = self.compute(*self._at_16k(wav[rows, :short], n[rows]))
            for b, emb in zip(todo, fresh):
                self._cache[keys[b]] = emb
        out = torch.stack([self._cache[key] for key in keys]).to(wav.device)
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def _at_16k(self, wav, n):
        """``wav`` at ``sample_rate`` with ``n`` real samples per row -> the same at 16 kHz."""
        if self.sample_rate == GE2E_SAMPLE_RATE:
            return wav, n
        rel = n.float() / wav.shape[-1]
        g = math.gcd(self.sample_rate, GE2E_SAMPLE_RATE)
        wav = AF.resample(wav, self.sample_rate // g, GE2E_SAMPLE_RATE // g, **KAISER_BEST)
        return wav, torch.round(rel * wav.shape[-1]).long().clamp(1, wav.shape[-1])

    @staticmethod
    def _content_key(x: torch.Tensor) -> str:
        return hashlib.sha1(x.detach().contiguous().cpu().numpy().tobytes()).hexdigest()

    def clear_cache(self):
        self._cache.clear()
