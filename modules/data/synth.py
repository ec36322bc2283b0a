"""Embedded default data: a small, deterministic, speech-*like* multi-speaker corpus.

This is NOT real speech. It exists so that every recipe runs on a fresh machine with no download.
Each synthetic "speaker" has its own pitch range, vocal-tract length (formant scaling), speaking
rate and breathiness. An utterance is a sequence of syllables: an optional noise-burst consonant
followed by a voiced vowel (a harmonic glottal source with a drifting pitch contour, filtered by
a cascade of formant resonators), shaped by a syllable-like envelope, with occasional pauses.

The corpus is written in the "one folder per speaker" layout (``<root>/<speaker>/<utt>.wav``),
so it goes through exactly the same data pipeline as a real corpus.
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
from scipy.signal import lfilter
from tqdm import tqdm

# Average adult formants F1-F3 (Hz) of five vowels (Peterson & Barney style figures).
VOWELS = np.array([
    [730, 1090, 2440],  # a
    [270, 2290, 3010],  # i
    [300, 870, 2240],   # u
    [530, 1840, 2480],  # e
    [570, 840, 2410],   # o
], dtype=np.float64)
BANDWIDTHS = np.array([80.0, 110.0, 160.0])


def speaker_profile(seed: int, index: int) -> dict:
    """Random but reproducible voice parameters of synthetic speaker ``index``."""
    rng = np.random.default_rng([seed, index, 1])
    low_voice = rng.random() < 0.5
    return {
        "f0": rng.uniform(85, 150) if low_voice else rng.uniform(165, 280),
        "f0_spread": rng.uniform(0.08, 0.25),
        "vtl": rng.uniform(0.88, 1.0) if low_voice else rng.uniform(1.0, 1.18),
        "rate": rng.uniform(3.0, 5.5),
        "breath": rng.uniform(0.005, 0.04),
        "tilt": rng.uniform(0.8, 1.6),
        "vowel_bias": rng.dirichlet(np.ones(len(VOWELS))),
    }


def _resonators(x, formants, sr):
    for f, bw in zip(formants, BANDWIDTHS):
        r = np.exp(-np.pi * bw / sr)
        a = [1.0, -2 * r * np.cos(2 * np.pi * f / sr), r * r]
        x = lfilter([1.0 - r], a, x)
    return x


def _envelope(n, rng):
    attack = max(1, int(n * rng.uniform(0.1, 0.3)))
    release = max(1, int(n * rng.uniform(0.2, 0.4)))
    env = np.ones(n)
    env[:attack] = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, attack))
    env[n - release:] = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, release))
    return env


def synth_utterance(profile: dict, seconds: float, sr: int, rng) -> np.ndarray:
    """One utterance of about ``seconds`` seconds, float64 in [-1, 1]."""
    out = np.zeros(int(seconds * sr))
    pos = int(rng.uniform(0.05, 0.2) * sr)
    while pos < len(out) - int(0.1 * sr):
        if rng.random() < 0.12:  # pause
            pos += int(rng.uniform(0.1, 0.3) * sr)
            continue
        dur = rng.uniform(0.7, 1.3) / profile["rate"]
        n = min(int(dur * sr), len(out) - pos)
        syl = np.zeros(n)
        start = 0
        if rng.random() < 0.5:  # consonant: short filtered noise burst
            nc = min(n // 3, int(rng.uniform(0.03, 0.08) * sr))
            burst = lfilter([1, -0.95], [1], rng.standard_normal(nc)) * rng.uniform(0.05, 0.2)
            syl[:nc] = burst * _envelope(nc, rng)
            start = nc
        nv = n - start
        t = np.arange(nv) / sr
        f0 = profile["f0"] * (1 + profile["f0_spread"] * np.sin(
            2 * np.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0, 2 * np.pi)))
        f0 *= np.linspace(1.0, rng.uniform(0.85, 1.05), nv)  # declination
        phase = 2 * np.pi * np.cumsum(f0) / sr
        n_harm = int(sr / 2 / f0.max())
        k = np.arange(1, n_harm + 1)[:, None]
        source = (np.sin(k * phase[None, :]) / k ** profile["tilt"]).sum(0)
        source += profile["breath"] * rng.standard_normal(nv)
        vowel = VOWELS[rng.choice(len(VOWELS), p=profile["vowel_bias"])]
        formants = vowel * profile["vtl"] * rng.uniform(0.95, 1.05, size=3)
        voiced = _resonators(source, np.minimum(formants, 0.45 * sr), sr)
        voiced /= np.abs(voiced).max() + 1e-9
        syl[start:] += voiced * _envelope(nv, rng) * rng.uniform(0.4, 1.0)
        out[pos:pos + n] += syl
        pos += n
    return out / (np.abs(out).max() + 1e-9) * 0.7


def make_corpus(root: str, seed: int = 1234, n_speakers: int = 24, utts_per_speaker: int = 8,
                min_seconds: float = 2.5, max_seconds: float = 5.0, sample_rate: int = 16000,
                progress: bool = True) -> str:
    """Write (once) a synthetic corpus ``<root>/synth-<seed>-<n_speakers>x<utts>/<spk>/<utt>.wav``.

    Returns the corpus folder. A ``DONE`` marker makes repeated calls free; the content depends
    only on the arguments.
    """
    folder = os.path.join(root, f"synth-{seed}-{n_speakers}x{utts_per_speaker}-{sample_rate}")
    if os.path.exists(os.path.join(folder, "DONE")):
        return folder
    items = [(s, u) for s in range(n_speakers) for u in range(utts_per_speaker)]
    if progress:
        items = tqdm(items, desc="synthesising speech-like corpus", unit="utt")
    for s, u in items:
        profile = speaker_profile(seed, s)
        rng = np.random.default_rng([seed, s, u, 2])
        seconds = rng.uniform(min_seconds, max_seconds)
        wav = synth_utterance(profile, seconds, sample_rate, rng)
        spk = f"synth{s:03d}"
        os.makedirs(os.path.join(folder, spk), exist_ok=True)
        sf.write(os.path.join(folder, spk, f"{spk}_{u:03d}.wav"), wav.astype(np.float32),
                 sample_rate, subtype="PCM_16")
    with open(os.path.join(folder, "DONE"), "w") as f:
        f.write("synthetic speech-like corpus; not real speech\n")
    return folder
