"""Utterance audio at the model's sample rate, resampled once per file.

A file at another rate than the model's is resampled whole, once, and kept: on disk as a
float32 ``.npy`` under ``<cache_folder>/resampled_<rate>Hz/`` (shared by runs, processes and
data-loader workers, read through a memory map), or in this process's memory when no folder is
given. Crops are then cut from the resampled signal, so each crop costs a read and a speed
perturbation at the model rate (a small ``speed:100`` ratio), whatever the file's own rate.
Resampling each crop from the file's rate with the speed folded in instead builds a filter of
the joint ratio (44.1 kHz at 93 % to 16 kHz is 41013:16000), which is slow and large.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch

from modules.data.audio import read_audio, resample
from modules.data.corpora import Utterance


class ModelRateAudio:
    """Reads utterances at ``sample_rate``; see the module docstring for the cache."""

    def __init__(self, sample_rate: int, cache_folder: str | None = None):
        self.sample_rate = int(sample_rate)
        self.folder = (os.path.join(cache_folder, f"resampled_{self.sample_rate}Hz")
                       if cache_folder else None)
        self._signals = {}  # path -> resampled signal (array, or memory map of the cached file)

    def __getstate__(self):  # a worker process opens its own memory maps
        return {**self.__dict__, "_signals": {} if self.folder else self._signals}

    def read(self, utt: Utterance, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The part ``[start, stop)`` of ``utt`` (positions in samples of the file's own rate)
        at the model rate, ``[time]`` float32."""
        if utt.sample_rate == self.sample_rate:
            return read_audio(utt.path, start=start, stop=stop)[0]
        signal = self._signal(utt)
        ratio = self.sample_rate / utt.sample_rate
        first = round(start * ratio)
        last = len(signal) if stop is None else first + math.ceil((stop - start) * ratio)
        return torch.from_numpy(np.array(signal[first:last], dtype=np.float32))

    def _signal(self, utt: Utterance):
        if utt.path not in self._signals:
            path = self._cache_path(utt.path) if self.folder else None
            if path and os.path.exists(path):
                self._signals[utt.path] = np.load(path, mmap_mode="r")
            else:
                x, sr = read_audio(utt.path)
                y = resample(x, sr, self.sample_rate).numpy().astype(np.float32, copy=False)
                if path:
                    self._store(path, y)
                    self._signals[utt.path] = np.load(path, mmap_mode="r")
                else:
                    self._signals[utt.path] = y
        return self._signals[utt.path]

    def _cache_path(self, audio_path: str) -> str:
        """Cache file of ``audio_path``: named by the path, size and modification time, so an
        edited or replaced file is resampled anew."""
        st = os.stat(audio_path)
        key = f"{os.path.abspath(audio_path)}|{st.st_size}|{st.st_mtime_ns}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:20]
        stem = os.path.splitext(os.path.basename(audio_path))[0]
        return os.path.join(self.folder, f"{stem}-{digest}.npy")

    @staticmethod
    def _store(path: str, y: np.ndarray):
        """Write ``y`` to ``path`` whole or not at all (processes may write the same file)."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path[:-4]}.{os.getpid()}.tmp.npy"
        np.save(tmp, y)
        os.replace(tmp, path)
