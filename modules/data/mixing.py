"""Separation data: mixtures drawn from single-speaker corpora, and published mixtures.

:class:`SeparationData` (the recipes' ``data:`` object) reads ``data_folder`` as
:mod:`modules.data.corpora` describes. Speakers are split into disjoint train / valid / test
sets; training mixtures of ``n_src`` speakers are made on the fly (random crops, speed
perturbation, source-to-source SNR drawn from a range), valid and test mixtures are drawn once
from a seed and are the same on every run. Published mixtures (LibriMix, WSJ0-2mix) are read as
they are. With ``data_folder: null`` a synthetic speech-like corpus (:mod:`modules.data.synth`,
not real speech) is generated and used as a single-speaker corpus.

Every dataset item is ``{"id": str, "mix": [time], "sources": [time, n_src]}`` at
``sample_rate``. Target-speaker extraction data is in :mod:`modules.data.enrolment`, the
data report in :mod:`modules.data.report`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from modules.data.audio import audio_info, read_audio, resample
from modules.data.corpora import (SPLITS, CorpusKind, detect_corpus, folders_of, group_by_speaker,
                                  scan_corpora, split_corpora)
from modules.data.published import find_librimix_csvs, librimix_rows, wsj0mix_rows
from modules.data.resampled import ModelRateAudio
from modules.data.seeding import EpochSeeded
from modules.data.synth import make_corpus

logger = logging.getLogger(__name__)

# The fixed lists (valid, test, overfit) draw from generators keyed (seed, FIXED_LISTS, list):
# the middle entry keeps them apart from the training draws, keyed (seed, epoch, item), as no
# run trains for 7919 epochs; the last entry keeps the lists apart from each other.
FIXED_LISTS = 7919
VALID_LIST, TEST_LIST, OVERFIT_LIST = 1, 2, 3
# samples read past the end of a crop, so that the speed-perturbation filter has its context
# and the perturbed crop is never short
READ_MARGIN = 64
# peak level of a rendered mixture (and of an enrolment): drawn, so that no level is special
PEAK_RANGE = (0.3, 0.9)


@dataclass
class MixSpec:
    """Everything needed to render one mixture, deterministically.

    ``starts`` are in samples of each utterance's own rate; ``speeds`` in percent (100 = none);
    ``snrs_db[k]`` is the requested level of source k relative to source 0 (``snrs_db[0] = 0``);
    ``length`` in samples at the target rate; ``peak`` the peak level of the rendered mixture.
    """

    id: str
    utts: list
    starts: list
    speeds: list
    snrs_db: list
    length: int
    peak: float = 0.9


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """Trim or zero-pad ``x`` to ``length`` samples."""
    out = x.new_zeros(length)
    n = min(len(x), length)
    out[:n] = x[:n]
    return out


def speed_perturb(x: torch.Tensor, speed: int) -> torch.Tensor:
    """``x`` played ``speed`` % as fast at the same rate (100: unchanged): a resampling by
    ``speed:100``, as SpeechBrain's ``SpeedPerturb`` does (``speechbrain/augment/time_domain.py``)."""
    return resample(x, speed, 100)


def render_mixture(spec: MixSpec, utts: dict, sample_rate: int, audio: ModelRateAudio | None = None):
    """Render ``spec``: returns ``(mix [time], sources [time, n_src])``.

    Each source is read at ``sample_rate`` through ``audio`` (a :class:`ModelRateAudio`; a new
    one, caching nothing beyond this call, when None), then speed-perturbed. Source k is scaled so
    that 10 log10(P_0 / P_k) equals ``-spec.snrs_db[k]`` exactly (powers over the rendered
    segment), then mixture and sources share one gain that sets the mixture peak to
    ``spec.peak``.
    """
    audio = audio if audio is not None else ModelRateAudio(sample_rate)
    if audio.sample_rate != sample_rate:
        raise ValueError(f"audio reads at {audio.sample_rate} Hz but the mixture is rendered at "
                         f"{sample_rate} Hz; pass a ModelRateAudio({sample_rate})")
    sources = []
    for uid, start, speed in zip(spec.utts, spec.starts, spec.speeds):
        u = utts[uid]
        need = math.ceil(spec.length * u.sample_rate * speed / (100 * sample_rate)) + READ_MARGIN
        x = audio.read(u, start, min(u.frames, start + need))
        sources.append(_fit(speed_perturb(x, speed), spec.length))
    sources = torch.stack(sources, -1)
    power = sources.pow(2).mean(0).clamp_min(1e-12)
    snr = torch.tensor(spec.snrs_db, dtype=power.dtype)
    gains = torch.sqrt(power[0] / power * 10 ** (snr / 10))
    sources = sources * gains
    mix = sources.sum(-1)
    peak = max(float(mix.abs().max()), float(sources.abs().max()), 1e-9)
    g = spec.peak / peak
    return mix * g, sources * g


def achieved_snrs(sources: torch.Tensor) -> list:
    """Level of each source relative to source 0 in dB, ``[time, S]`` -> list of S floats."""
    p = sources.double().pow(2).mean(0)
    return [float(10 * torch.log10(p[k] / p[0])) for k in range(sources.shape[1])]


def draw_spec(rng, mix_id, speakers, by_speaker, n_src, sample_rate, snr_range,
              segment_seconds=None, max_seconds=None, speed_range=(1.0, 1.0)) -> MixSpec:
    """Draw a mixture of ``n_src`` distinct speakers.

    Training (``segment_seconds`` set): a random crop of that length from each utterance, with
    speed perturbation. Evaluation (``segment_seconds`` None): the length of the shortest
    utterance ("min" mode of LibriMix), capped at ``max_seconds``.
    """
    chosen = rng.choice(len(speakers), size=n_src, replace=False)
    utts = [by_speaker[speakers[i]][rng.integers(len(by_speaker[speakers[i]]))] for i in chosen]
    lo, hi = speed_range
    speeds = [int(round(100 * rng.uniform(lo, hi))) for _ in utts]
    if segment_seconds is not None:
        length = int(round(segment_seconds * sample_rate))
    else:
        length = min(int(u.frames * sample_rate / u.sample_rate) for u in utts)
        if max_seconds:
            length = min(length, int(max_seconds * sample_rate))
    starts = []
    for u, sp in zip(utts, speeds):
        need = math.ceil(length * u.sample_rate * sp / (100 * sample_rate))
        starts.append(int(rng.integers(0, u.frames - need + 1)) if u.frames > need else 0)
    snrs = [0.0] + [float(rng.uniform(*snr_range)) for _ in utts[1:]]
    return MixSpec(mix_id, [u.id for u in utts], starts, speeds, snrs, length,
                   peak=float(rng.uniform(*PEAK_RANGE)))


class MixtureDataset(EpochSeeded, Dataset):
    """Mixtures rendered from :class:`MixSpec` (fixed list) or drawn on the fly.

    Fixed: ``specs`` given; item i is always the same. On the fly: ``n_items`` mixtures per epoch,
    item i of epoch e drawn from a generator seeded with ``(seed, e, i)``, so a resumed run sees
    the same data as an uninterrupted one. Call :meth:`set_epoch` at the start of each epoch.
    ``audio`` reads the utterances at ``sample_rate`` (default: a :class:`ModelRateAudio` that
    keeps each resampled file in memory).
    """

    def __init__(self, utts, sample_rate, specs=None, n_items=0, n_src=2, snr_range=(-5, 5),
                 segment_seconds=4.0, speed_range=(0.9, 1.1), seed=0, audio=None):
        self.utts = {u.id: u for u in utts}
        self.sample_rate = sample_rate
        self.specs = specs
        self.n_items = len(specs) if specs is not None else n_items
        self.by_speaker = group_by_speaker(utts)
        self.speakers = sorted(self.by_speaker)
        self.kw = dict(n_src=n_src, sample_rate=sample_rate, snr_range=tuple(snr_range),
                       segment_seconds=segment_seconds, speed_range=tuple(speed_range))
        self.seed = seed
        self.epoch = 0
        self.audio = audio if audio is not None else ModelRateAudio(sample_rate)

    def __len__(self):
        return self.n_items

    def spec(self, i: int) -> MixSpec:
        if self.specs is not None:
            return self.specs[i]
        return draw_spec(self.item_rng(i), f"train_e{self.epoch}_{i}", self.speakers,
                         self.by_speaker, **self.kw)

    def __getitem__(self, i):
        spec = self.spec(i)
        mix, sources = render_mixture(spec, self.utts, self.sample_rate, self.audio)
        return {"id": spec.id, "mix": mix, "sources": sources}


class FileMixtureDataset(EpochSeeded, Dataset):
    """Published mixtures on disk (LibriMix, WSJ0-2mix): rows of ``(id, mix_path, [src_paths])``.

    With ``segment_seconds`` each item is a random crop (training); otherwise the whole file.
    """

    def __init__(self, rows, sample_rate, segment_seconds=None, seed=0):
        self.rows = rows
        self.sample_rate = sample_rate
        self.segment_seconds = segment_seconds
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        uid, mix_path, src_paths = self.rows[i]
        frames, sr, _ = audio_info(mix_path)
        start, stop = 0, None
        if self.segment_seconds:
            need = int(self.segment_seconds * sr)
            if frames > need:
                start = int(self.item_rng(i).integers(0, frames - need + 1))
                stop = start + need
        sigs = []
        for p in [mix_path, *src_paths]:
            x, file_sr = read_audio(p, start=start, stop=stop)
            sigs.append(resample(x, file_sr, self.sample_rate))
        n = min(len(s) for s in sigs)
        return {"id": uid, "mix": sigs[0][:n], "sources": torch.stack([s[:n] for s in sigs[1:]], -1)}


class SeparationData:
    """Builds the train / valid / test datasets of a separation recipe from its hparams.

    Arguments (all visible in the recipe yaml)
    ---------
    data_folder : str, list of str, or None
        Corpus folder, or a list of single-speaker corpus folders whose speakers are pooled
        (each corpus split on its own, see :func:`modules.data.corpora.split_corpora`); None
        generates the synthetic speech-like corpus into ``cache_folder``.
    save_folder : str
        Where the manifest and the fixed mixture lists are written.
    cache_folder : str
        Caches shared by runs: the synthetic corpus, and the utterances of files at another rate
        than ``sample_rate``, resampled once (:class:`modules.data.resampled.ModelRateAudio`).
    n_src, sample_rate : int
    segment_seconds : float
        Training crop length.
    snr_range : [float, float]
        Source-to-source SNR range (dB) of generated mixtures.
    speed_range : [float, float]
        Speed perturbation range of training mixtures (1.0 = none).
    train_mixtures_per_epoch, n_valid, n_test : int
    eval_max_seconds : float
        Cap on the length of valid/test mixtures.
    valid_fraction, test_fraction : float
        Fractions of speakers held out.
    speaker_pattern : str or None
        Regex whose first group is the speaker, for flat folders.
    overfit_mixtures : int
        If > 0: train, valid and test are the same N fixed mixtures of training speakers (the
        overfit check), each repeated ``overfit_repeats`` times per training epoch.
    synthetic_speakers, synthetic_utts_per_speaker : int
        Size of the synthetic corpus.
    seed : int
    """

    def __init__(self, data_folder=None, save_folder="results/data", cache_folder="results/data_cache",
                 n_src=2, sample_rate=8000, segment_seconds=4.0, snr_range=(-5.0, 5.0),
                 speed_range=(0.9, 1.1), train_mixtures_per_epoch=2000, n_valid=50, n_test=100,
                 eval_max_seconds=8.0, valid_fraction=0.1, test_fraction=0.1, speaker_pattern=None,
                 overfit_mixtures=0, overfit_repeats=20, synthetic_speakers=40,
                 synthetic_utts_per_speaker=6, seed=1234):
        self.data_folder = data_folder
        self.folders = folders_of(data_folder)
        self.save_folder = save_folder
        self.cache_folder = cache_folder
        self.n_src = n_src
        self.sample_rate = sample_rate
        self.segment_seconds = segment_seconds
        self.snr_range = snr_range
        self.speed_range = speed_range
        self.train_mixtures_per_epoch = train_mixtures_per_epoch
        self.n_valid = n_valid
        self.n_test = n_test
        self.eval_max_seconds = eval_max_seconds
        self.valid_fraction = valid_fraction
        self.test_fraction = test_fraction
        self.speaker_pattern = speaker_pattern
        self.overfit_mixtures = overfit_mixtures
        self.overfit_repeats = overfit_repeats
        self.synthetic_speakers = synthetic_speakers
        self.synthetic_utts_per_speaker = synthetic_utts_per_speaker
        self.seed = seed
        self.kind = self._corpus_kind()
        self.audio = ModelRateAudio(sample_rate, cache_folder)
        self.unreadable, self.missing = [], []
        self.corpora = {}  # {corpus name: [Utterance]} once a single-speaker corpus is scanned

    def _corpus_kind(self) -> CorpusKind:
        """Decided once, in ``__init__`` (:class:`TSEData` adds its lists)."""
        return detect_corpus(self.folders)

    # -- single-speaker corpora ---------------------------------------------------------------
    def _speaker_corpus(self):
        folders = self.folders
        if self.kind == CorpusKind.SYNTHETIC:
            folders = [make_corpus(self.cache_folder, seed=self.seed, n_speakers=self.synthetic_speakers,
                                   utts_per_speaker=self.synthetic_utts_per_speaker)]
            logger.info("using the synthetic speech-like corpus in %s (NOT real speech)", folders[0])
        self.corpora, self.unreadable = scan_corpora(folders, self.speaker_pattern, self.save_folder)
        return split_corpora(self.corpora, self.valid_fraction, self.test_fraction, self.seed,
                             min_per_split=self.n_src)

    def _fixed_specs(self, name, utts, n, list_key, segment_seconds=None):
        """Draw the fixed mixture list ``name`` from ``(seed, FIXED_LISTS, list_key)`` and write
        it to ``<save_folder>/<name>_mixtures.json``."""
        path = os.path.join(self.save_folder, f"{name}_mixtures.json")
        by_speaker = group_by_speaker(utts)
        speakers = sorted(by_speaker)
        rng = np.random.default_rng([self.seed, FIXED_LISTS, list_key])
        specs = [self._draw_spec(rng, f"{name}_{i:04d}", speakers, by_speaker, segment_seconds)
                 for i in range(n)]
        os.makedirs(self.save_folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump([asdict(s) for s in specs], f, indent=0)
        return specs

    def _draw_spec(self, rng, mix_id, speakers, by_speaker, segment_seconds=None):
        """One fixed mixture of the valid/test lists (:class:`TSEData` adds an enrolment)."""
        return draw_spec(rng, mix_id, speakers, by_speaker, self.n_src, self.sample_rate,
                         self.snr_range, segment_seconds=segment_seconds,
                         max_seconds=self.eval_max_seconds)

    def _mixtures(self, utts, **kwargs):
        """Dataset of generated mixtures (:class:`TSEData` returns an :class:`ExtractionDataset`)."""
        return MixtureDataset(utts, self.sample_rate, audio=self.audio, **kwargs)

    def datasets(self):
        """``{"train": Dataset, "valid": Dataset, "test": Dataset}``."""
        if self.kind == CorpusKind.LIBRIMIX:
            return self._librimix()
        if self.kind == CorpusKind.WSJ0MIX:
            return self._wsj0mix()
        by_split = self._speaker_corpus()
        all_utts = [u for s in SPLITS for u in by_split[s]]
        if self.overfit_mixtures:
            specs = self._fixed_specs("overfit", by_split["train"], self.overfit_mixtures,
                                      OVERFIT_LIST, segment_seconds=self.segment_seconds)
            fixed = self._mixtures(all_utts, specs=specs)
            train = self._mixtures(all_utts, specs=specs * self.overfit_repeats)
            return {"train": train, "valid": fixed, "test": fixed}
        train = self._mixtures(by_split["train"], n_items=self.train_mixtures_per_epoch,
                               n_src=self.n_src, snr_range=self.snr_range,
                               segment_seconds=self.segment_seconds,
                               speed_range=self.speed_range, seed=self.seed)
        out = {"train": train}
        for s, n, key in (("valid", self.n_valid, VALID_LIST), ("test", self.n_test, TEST_LIST)):
            out[s] = self._mixtures(by_split[s], specs=self._fixed_specs(s, by_split[s], n, key))
        return out

    # -- published mixtures ------------------------------------------------------------------
    def _file_sets(self, rows_by_split):
        for s in SPLITS:
            if not rows_by_split.get(s):
                raise FileNotFoundError(f"no {s} mixtures found in {self.data_folder}")
        return {
            "train": FileMixtureDataset(rows_by_split["train"], self.sample_rate,
                                        segment_seconds=self.segment_seconds, seed=self.seed),
            "valid": FileMixtureDataset(rows_by_split["valid"][: self.n_valid or None], self.sample_rate),
            "test": FileMixtureDataset(rows_by_split["test"], self.sample_rate),
        }

    def _librimix(self):
        folder = self.folders[0]
        rows = {}
        for split, paths in find_librimix_csvs(folder).items():
            rows[split], missing = librimix_rows(paths, folder, self.n_src)
            self.missing += missing
        for m in self.missing[:10]:
            logger.warning("skipping mixture: %s", m)
        return self._file_sets(rows)

    def _wsj0mix(self):
        rows = {}
        for split, name in (("train", "tr"), ("valid", "cv"), ("test", "tt")):
            rows[split], missing = wsj0mix_rows(self.folders[0], name, self.n_src)
            self.missing += missing
        return self._file_sets(rows)
