"""Data pipelines for separation: corpora, speaker-disjoint splits, on-the-fly mixing, reports.

Three kinds of ``data_folder`` are understood (detected in this order):

* **LibriMix** (Libri2Mix / Libri3Mix as published): a folder holding the ``metadata`` CSVs
  ``mixture_<split>_mix_clean.csv`` (columns ``mixture_ID, mixture_path, source_1_path, ...``).
* **WSJ0-2mix / WSJ0-3mix** as published: a folder with ``tr/``, ``cv/``, ``tt/``, each holding
  ``mix/``, ``s1/``, ``s2/`` (and ``s3/``) with the same file names.
* **Any single-speaker corpus**: LibriSpeech layout ``<spk>/<chapter>/<spk>-<chapter>-<utt>.flac``
  or one folder per speaker (VCTK, AISHELL-3, ``<spk>/*.wav``); or any flat folder with a
  ``speaker_pattern`` regex whose first group extracts the speaker from the file name. Speakers
  are split into disjoint train / valid / test sets; training mixtures of ``n_src`` speakers are
  made on the fly (random crops, speed perturbation, source-to-source SNR drawn from a range),
  valid and test mixtures are drawn once from a seed and are the same on every run.

With ``data_folder: null`` a synthetic speech-like corpus (:mod:`modules.synth`, not real speech)
is generated and used as a single-speaker corpus.

:class:`TSEData` builds the same sets for target-speaker extraction: source 0 of each mixture is
the target and each item also carries an enrolment utterance of the target speaker (see
:func:`draw_extraction_spec`), or reads Libri2Mix-style TSE lists.

Every dataset item is ``{"id": str, "mix": [time], "sources": [time, n_src]}`` at
``sample_rate``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .audio import AudioError, audio_info, read_audio, resample

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3")
LIBRISPEECH_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")
SPLITS = ("train", "valid", "test")


@dataclass
class Utterance:
    id: str
    path: str
    speaker: str
    frames: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


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


# --------------------------------------------------------------------------------------------
# Corpus discovery and speaker split


def speaker_of(path: str, speaker_pattern: str | None = None) -> str:
    """Speaker of an audio file: the regex group, the LibriSpeech name, or the parent folder."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if speaker_pattern:
        m = re.search(speaker_pattern, stem)
        if not m:
            raise ValueError(f"speaker_pattern {speaker_pattern!r} does not match file name {stem!r}")
        return m.group(1)
    m = LIBRISPEECH_NAME.match(stem)
    if m:
        return m.group(1)
    return os.path.basename(os.path.dirname(path))


def scan_corpus(folder: str, speaker_pattern: str | None = None, manifest: str | None = None):
    """List the utterances of a single-speaker corpus. Returns ``(utterances, unreadable)``.

    Unreadable files are not fatal: they are returned (and logged) so a report can list them.
    When ``manifest`` (a JSON path) exists and was made from the same folder it is reused.
    """
    folder = os.path.abspath(folder)
    if manifest and os.path.exists(manifest):
        with open(manifest) as f:
            cached = json.load(f)
        if cached.get("folder") == folder and cached.get("speaker_pattern") == speaker_pattern:
            return [Utterance(**u) for u in cached["utterances"]], cached["unreadable"]
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if p.lower().endswith(AUDIO_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(
            f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {folder}; point data_folder "
            "at a corpus (LibriSpeech layout, one folder per speaker, LibriMix or WSJ0-2mix)")
    utts, bad = [], []
    from tqdm import tqdm

    for p in tqdm(paths, desc=f"scanning {os.path.basename(folder)}", unit="file",
                  disable=len(paths) < 2000):
        try:
            frames, sr, _ = audio_info(p)
        except AudioError as err:
            bad.append(str(err))
            logger.warning("skipping %s", err)
            continue
        if frames == 0:
            bad.append(f"{p}: empty file")
            continue
        uid = os.path.relpath(p, folder).rsplit(".", 1)[0].replace(os.sep, "_")
        utts.append(Utterance(uid, p, speaker_of(p, speaker_pattern), frames, sr))
    if manifest:
        os.makedirs(os.path.dirname(os.path.abspath(manifest)), exist_ok=True)
        with open(manifest, "w") as f:
            json.dump({"folder": folder, "speaker_pattern": speaker_pattern,
                       "utterances": [asdict(u) for u in utts], "unreadable": bad}, f)
    return utts, bad


def split_speakers(speakers, valid_fraction=0.1, test_fraction=0.1, seed=0, min_per_split=2):
    """Speaker-disjoint split. Returns ``{"train": [...], "valid": [...], "test": [...]}``.

    The shuffle depends only on ``seed`` and the sorted speaker names; valid and test get at
    least ``min_per_split`` speakers each.
    """
    speakers = sorted(set(speakers))
    if len(speakers) < 3 * min_per_split:
        raise ValueError(
            f"found {len(speakers)} speakers but need at least {3 * min_per_split} to make "
            f"speaker-disjoint train/valid/test sets of {min_per_split}-speaker mixtures; check the "
            "folder layout or set speaker_pattern")
    order = np.random.default_rng(seed).permutation(len(speakers))
    shuffled = [speakers[i] for i in order]
    n_test = max(min_per_split, round(test_fraction * len(speakers)))
    n_valid = max(min_per_split, round(valid_fraction * len(speakers)))
    return {
        "test": sorted(shuffled[:n_test]),
        "valid": sorted(shuffled[n_test:n_test + n_valid]),
        "train": sorted(shuffled[n_test + n_valid:]),
    }


# --------------------------------------------------------------------------------------------
# Mixing


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """Trim or zero-pad ``x`` to ``length`` samples."""
    out = x.new_zeros(length)
    n = min(len(x), length)
    out[:n] = x[:n]
    return out


def render_mixture(spec: MixSpec, utts: dict, sample_rate: int):
    """Render ``spec``: returns ``(mix [time], sources [time, n_src])``.

    Source k is scaled so that 10 log10(P_0 / P_k) equals ``-spec.snrs_db[k]`` exactly (powers
    over the rendered segment), then mixture and sources share one gain that sets the mixture
    peak to ``spec.peak``.
    """
    sources = []
    for uid, start, speed in zip(spec.utts, spec.starts, spec.speeds):
        u = utts[uid]
        need = math.ceil(spec.length * u.sample_rate * speed / (100 * sample_rate)) + 64
        x, sr = read_audio(u.path, start=start, stop=min(u.frames, start + need))
        # Speed perturbation and resampling in one step: play `speed`% faster at sample_rate.
        x = resample(x, sr * speed, sample_rate * 100)
        sources.append(_fit(x, spec.length))
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
                   peak=float(rng.uniform(0.3, 0.9)))


class MixtureDataset(Dataset):
    """Mixtures rendered from :class:`MixSpec` (fixed list) or drawn on the fly.

    Fixed: ``specs`` given; item i is always the same. On the fly: ``n_items`` mixtures per epoch,
    item i of epoch e drawn from a generator seeded with ``(seed, e, i)``, so a resumed run sees
    the same data as an uninterrupted one. Call :meth:`set_epoch` at the start of each epoch.
    """

    def __init__(self, utts, sample_rate, specs=None, n_items=0, n_src=2, snr_range=(-5, 5),
                 segment_seconds=4.0, speed_range=(0.9, 1.1), seed=0):
        self.utts = {u.id: u for u in utts}
        self.sample_rate = sample_rate
        self.specs = specs
        self.n_items = len(specs) if specs is not None else n_items
        self.by_speaker = {}
        for u in utts:
            self.by_speaker.setdefault(u.speaker, []).append(u)
        self.speakers = sorted(self.by_speaker)
        self.kw = dict(n_src=n_src, sample_rate=sample_rate, snr_range=tuple(snr_range),
                       segment_seconds=segment_seconds, speed_range=tuple(speed_range))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n_items

    def spec(self, i: int) -> MixSpec:
        if self.specs is not None:
            return self.specs[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return draw_spec(rng, f"train_e{self.epoch}_{i}", self.speakers, self.by_speaker, **self.kw)

    def __getitem__(self, i):
        spec = self.spec(i)
        mix, sources = render_mixture(spec, self.utts, self.sample_rate)
        return {"id": spec.id, "mix": mix, "sources": sources}


class FileMixtureDataset(Dataset):
    """Published mixtures on disk (LibriMix, WSJ0-2mix): rows of ``(id, mix_path, [src_paths])``.

    With ``segment_seconds`` each item is a random crop (training); otherwise the whole file.
    """

    def __init__(self, rows, sample_rate, segment_seconds=None, seed=0):
        self.rows = rows
        self.sample_rate = sample_rate
        self.segment_seconds = segment_seconds
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        uid, mix_path, src_paths = self.rows[i]
        frames, sr, _ = audio_info(mix_path)
        start, stop = 0, None
        if self.segment_seconds:
            need = int(self.segment_seconds * sr)
            if frames > need:
                rng = np.random.default_rng([self.seed, self.epoch, i])
                start = int(rng.integers(0, frames - need + 1))
                stop = start + need
        sigs = []
        for p in [mix_path, *src_paths]:
            x, file_sr = read_audio(p, start=start, stop=stop)
            sigs.append(resample(x, file_sr, self.sample_rate))
        n = min(len(s) for s in sigs)
        return {"id": uid, "mix": sigs[0][:n], "sources": torch.stack([s[:n] for s in sigs[1:]], -1)}


def _find_librimix_csvs(folder: str):
    csvs = glob.glob(os.path.join(folder, "**", "*.csv"), recursive=True)
    found = {}
    for path in sorted(csvs):
        name = os.path.basename(path)
        if "mix_clean" not in name:
            continue
        with open(path) as f:
            header = f.readline()
        if "mixture_path" not in header:
            continue
        split = "train" if "train" in name else "valid" if "dev" in name else "test" if "test" in name else None
        if split:
            found.setdefault(split, []).append(path)
    return found


def _resolve(path: str, folder: str) -> str:
    """Resolve a metadata path: as written, relative to ``folder``, or re-rooted at ``folder``
    from its ``wav8k``/``wav16k`` component (published CSVs hold the generating machine's paths)."""
    if os.path.isabs(path) and os.path.exists(path):
        return path
    cand = os.path.join(folder, path)
    if os.path.exists(cand):
        return cand
    parts = path.replace("\\", "/").split("/")
    for k, part in enumerate(parts):
        if part.startswith("wav") and part.endswith("k"):
            for base in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
                cand = os.path.join(base, *parts[k:])
                if os.path.exists(cand):
                    return cand
    return path


def librimix_rows(csv_paths, folder, n_src):
    rows, missing = [], []
    for path in csv_paths:
        with open(path) as f:
            for r in csv.DictReader(f):
                srcs = [_resolve(r[f"source_{k + 1}_path"], folder) for k in range(n_src)]
                mix = _resolve(r["mixture_path"], folder)
                absent = [p for p in [mix, *srcs] if not os.path.exists(p)]
                if absent:
                    missing.append(f"{path}: {r['mixture_ID']}: missing {absent[0]}")
                    continue
                rows.append((r["mixture_ID"], mix, srcs))
    return rows, missing


def wsj0mix_rows(folder, split, n_src):
    mix_dir = os.path.join(folder, split, "mix")
    rows, missing = [], []
    for mix in sorted(glob.glob(os.path.join(mix_dir, "*.wav"))):
        name = os.path.basename(mix)
        srcs = [os.path.join(folder, split, f"s{k + 1}", name) for k in range(n_src)]
        absent = [p for p in srcs if not os.path.exists(p)]
        if absent:
            missing.append(f"{mix}: missing {absent[0]}")
            continue
        rows.append((os.path.splitext(name)[0], mix, srcs))
    return rows, missing


def detect_corpus(folder: str | None) -> str:
    """``"synthetic"``, ``"librimix"``, ``"wsj0mix"`` or ``"speakers"``."""
    if folder is None:
        return "synthetic"
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data_folder {folder} is not a folder")
    if all(os.path.isdir(os.path.join(folder, s, "mix")) for s in ("tr", "cv", "tt")):
        return "wsj0mix"
    if _find_librimix_csvs(folder):
        return "librimix"
    return "speakers"


class SeparationData:
    """Builds the train / valid / test datasets of a separation recipe from its hparams.

    Arguments (all visible in the recipe yaml)
    ---------
    data_folder : str or None
        Corpus folder; None generates the synthetic speech-like corpus into ``cache_folder``.
    save_folder : str
        Where the manifest and the fixed mixture lists are written.
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
    seed : int
    """

    def __init__(self, data_folder=None, save_folder="results/data", cache_folder="results/data_cache",
                 n_src=2, sample_rate=8000, segment_seconds=4.0, snr_range=(-5.0, 5.0),
                 speed_range=(0.9, 1.1), train_mixtures_per_epoch=2000, n_valid=50, n_test=100,
                 eval_max_seconds=8.0, valid_fraction=0.1, test_fraction=0.1, speaker_pattern=None,
                 overfit_mixtures=0, overfit_repeats=20, synthetic_speakers=40,
                 synthetic_utts_per_speaker=6, seed=1234):
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})
        self.kind = detect_corpus(data_folder)
        self.unreadable, self.missing = [], []

    # -- single-speaker corpora ---------------------------------------------------------------
    def _speaker_corpus(self):
        folder = self.data_folder
        if self.kind == "synthetic":
            folder = __import__("modules.synth", fromlist=["make_corpus"]).make_corpus(
                self.cache_folder, seed=self.seed, n_speakers=self.synthetic_speakers,
                utts_per_speaker=self.synthetic_utts_per_speaker)
            logger.info("using the synthetic speech-like corpus in %s (NOT real speech)", folder)
        utts, self.unreadable = scan_corpus(folder, self.speaker_pattern,
                                            manifest=os.path.join(self.save_folder, "manifest.json"))
        split = split_speakers([u.speaker for u in utts], self.valid_fraction, self.test_fraction,
                               self.seed, min_per_split=self.n_src)
        by_split = {s: [u for u in utts if u.speaker in set(spk)] for s, spk in split.items()}
        return by_split

    def _fixed_specs(self, name, utts, n, segment_seconds=None, seed_offset=0):
        """Draw (or reload) the fixed mixture list ``<save_folder>/<name>_mixtures.json``."""
        path = os.path.join(self.save_folder, f"{name}_mixtures.json")
        by_speaker = {}
        for u in utts:
            by_speaker.setdefault(u.speaker, []).append(u)
        speakers = sorted(by_speaker)
        rng = np.random.default_rng([self.seed, 7919, seed_offset])
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
        return MixtureDataset(utts, self.sample_rate, **kwargs)

    def datasets(self):
        """``{"train": Dataset, "valid": Dataset, "test": Dataset}``."""
        if self.kind == "librimix":
            return self._librimix()
        if self.kind == "wsj0mix":
            return self._wsj0mix()
        by_split = self._speaker_corpus()
        all_utts = [u for s in SPLITS for u in by_split[s]]
        if self.overfit_mixtures:
            specs = self._fixed_specs("overfit", by_split["train"], self.overfit_mixtures,
                                      segment_seconds=self.segment_seconds, seed_offset=3)
            fixed = self._mixtures(all_utts, specs=specs)
            train = self._mixtures(all_utts, specs=specs * self.overfit_repeats)
            return {"train": train, "valid": fixed, "test": fixed}
        train = self._mixtures(by_split["train"], n_items=self.train_mixtures_per_epoch,
                               n_src=self.n_src, snr_range=self.snr_range,
                               segment_seconds=self.segment_seconds,
                               speed_range=self.speed_range, seed=self.seed)
        out = {"train": train}
        for k, (s, n) in enumerate((("valid", self.n_valid), ("test", self.n_test))):
            out[s] = self._mixtures(by_split[s],
                                   specs=self._fixed_specs(s, by_split[s], n, seed_offset=k + 1))
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
        rows = {}
        for split, paths in _find_librimix_csvs(self.data_folder).items():
            rows[split], missing = librimix_rows(paths, self.data_folder, self.n_src)
            self.missing += missing
        for m in self.missing[:10]:
            logger.warning("skipping mixture: %s", m)
        return self._file_sets(rows)

    def _wsj0mix(self):
        rows = {}
        for split, name in (("train", "tr"), ("valid", "cv"), ("test", "tt")):
            rows[split], missing = wsj0mix_rows(self.data_folder, name, self.n_src)
            self.missing += missing
        return self._file_sets(rows)

    # -- report --------------------------------------------------------------------------------
    def report(self, n_train_samples: int = 100) -> str:
        """Text report: utterances, speakers, durations, sample rates per split, and the
        achieved-vs-requested SNR error of generated mixtures."""
        lines = [f"data_folder: {self.data_folder or '(synthetic speech-like corpus, NOT real speech)'}",
                 f"corpus kind: {self.kind}; n_src={self.n_src}; target rate {self.sample_rate} Hz"]
        sets = self.datasets()
        if self.kind in ("synthetic", "speakers"):
            by_split = {s: list(sets[s].utts.values()) for s in SPLITS}  # no second scan
            lines.append(f"{'split':6} {'speakers':>8} {'utts':>6} {'hours':>7} {'min s':>6} "
                         f"{'mean s':>6} {'max s':>6}  sample rates")
            for s in SPLITS:
                us = by_split[s]
                secs = np.array([u.seconds for u in us])
                rates = sorted({u.sample_rate for u in us})
                lines.append(f"{s:6} {len({u.speaker for u in us}):8d} {len(us):6d} "
                             f"{secs.sum() / 3600:7.3f} {secs.min():6.2f} {secs.mean():6.2f} "
                             f"{secs.max():6.2f}  {rates}")
            lines.append("mixtures: requested vs achieved source-to-source SNR")
            for s in SPLITS:
                ds = sets[s]
                n = min(len(ds), n_train_samples) if s == "train" else len(ds)
                errs, lens = [], []
                for i in range(n):
                    spec = ds.spec(i)
                    _, src = render_mixture(spec, ds.utts, self.sample_rate)
                    errs += [abs(a - r) for a, r in zip(achieved_snrs(src)[1:], spec.snrs_db[1:])]
                    lens.append(spec.length / self.sample_rate)
                lines.append(f"  {s:6} {n:5d} mixtures, {np.mean(lens):5.2f} s mean; |SNR error| "
                             f"mean {np.mean(errs):.2e} dB, max {np.max(errs):.2e} dB")
        else:
            lines.append(f"{'split':6} {'mixtures':>8} {'hours':>7} {'mean s':>6}  sample rates  "
                         "source-to-source SNR (dB, mean±std)")
            for s in SPLITS:
                rows = sets[s].rows
                infos = [audio_info(r[1]) for r in rows]
                secs = np.array([f / sr for f, sr, _ in infos])
                snrs = []
                for r in rows[: min(len(rows), n_train_samples)]:
                    srcs = torch.stack([read_audio(p)[0] for p in r[2]], -1)
                    snrs += achieved_snrs(srcs)[1:]
                lines.append(f"{s:6} {len(rows):8d} {secs.sum() / 3600:7.3f} {secs.mean():6.2f}  "
                             f"{sorted({sr for _, sr, _ in infos})}  {np.mean(snrs):+.2f}±{np.std(snrs):.2f}")
        problems = self.unreadable + self.missing
        lines.append(f"unreadable files / missing entries: {len(problems)}")
        lines += [f"  {p}" for p in problems[:20]]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Target-speaker extraction: mixtures + an enrolment utterance of the target (source 0)


@dataclass
class ExtractionSpec(MixSpec):
    """A :class:`MixSpec` whose source 0 is the target, plus an enrolment crop of the target
    speaker: ``enroll_length`` samples from ``enroll_start`` of ``enroll_utt`` (its own rate),
    rendered at peak ``enroll_peak``. ``enroll_mode`` is ``other-utterance`` or
    ``same-utterance`` (a crop of the target's own utterance that does not overlap its crop)."""

    enroll_utt: str = ""
    enroll_start: int = 0
    enroll_length: int = 0
    enroll_mode: str = "other-utterance"
    enroll_peak: float = 0.5


# samples left between the target crop and an enrolment cut from the same utterance, so that
# not even the resampling filter of one reaches into the other
_ENROLL_GAP = 64


def draw_extraction_spec(rng, mix_id, speakers, by_speaker, n_src, sample_rate, snr_range,
                         segment_seconds=None, max_seconds=None, speed_range=(1.0, 1.0),
                         enroll_seconds=3.0, min_enroll_seconds=1.0) -> ExtractionSpec:
    """:func:`draw_spec` + an enrolment of the target speaker (source 0).

    The enrolment is a crop of up to ``enroll_seconds`` of *another* utterance of the target
    speaker when there is one. Otherwise (one utterance per speaker, as the LibriSpeech excerpt)
    it is cut from the target's own utterance, before or after the target crop and not
    overlapping it: at least ``min_enroll_seconds`` (half the utterance if shorter), and the
    mixture is shortened when the rest of the utterance cannot hold the target crop.
    """
    spec = draw_spec(rng, mix_id, speakers, by_speaker, n_src, sample_rate, snr_range,
                     segment_seconds=segment_seconds, max_seconds=max_seconds, speed_range=speed_range)
    target = next(u for s in speakers for u in by_speaker[s] if u.id == spec.utts[0])
    others = [u for u in by_speaker[target.speaker] if u.id != target.id]
    want = int(round(enroll_seconds * target.sample_rate))
    peak = float(rng.uniform(0.3, 0.9))
    if others:
        u = others[int(rng.integers(len(others)))]
        length = min(want, u.frames)
        start = int(rng.integers(0, u.frames - length + 1))
        return ExtractionSpec(**asdict(spec), enroll_utt=u.id, enroll_start=start,
                              enroll_length=length, enroll_mode="other-utterance", enroll_peak=peak)
    frames, speed = target.frames, spec.speeds[0]

    def need(length):  # samples of the utterance that `length` output samples use
        return math.ceil(length * target.sample_rate * speed / (100 * sample_rate))

    length = min(want, frames - need(spec.length) - _ENROLL_GAP)
    if length < min_enroll_seconds * target.sample_rate:  # too short for both: split it
        length = min(want, int(min_enroll_seconds * target.sample_rate), frames // 2)
    room = frames - length - _ENROLL_GAP
    if need(spec.length) > room:
        spec.length = int(room * 100 * sample_rate / (target.sample_rate * speed))
        while spec.length > 1 and need(spec.length) > room:
            spec.length -= 1
    used = need(spec.length)
    if rng.random() < 0.5:  # enrolment first, target crop after it
        start, spec.starts[0] = 0, int(rng.integers(length + _ENROLL_GAP, frames - used + 1))
    else:
        start, spec.starts[0] = frames - length, int(rng.integers(0, room - used + 1))
    return ExtractionSpec(**asdict(spec), enroll_utt=target.id, enroll_start=start,
                          enroll_length=length, enroll_mode="same-utterance", enroll_peak=peak)


def render_enrollment(spec: ExtractionSpec, utts: dict, sample_rate: int) -> torch.Tensor:
    """The enrolment of ``spec`` at ``sample_rate`` (no speed perturbation), peak ``enroll_peak``."""
    u = utts[spec.enroll_utt]
    x, sr = read_audio(u.path, start=spec.enroll_start, stop=spec.enroll_start + spec.enroll_length)
    x = resample(x, sr, sample_rate)
    return x * (spec.enroll_peak / max(float(x.abs().max()), 1e-9))


def _extraction_item(uid, mix, target, interferer, enroll, mode):
    return {"id": uid, "mix": mix, "target": target, "interferer": interferer, "enroll": enroll,
            "enroll_mode": mode}


class ExtractionDataset(MixtureDataset):
    """:class:`MixtureDataset` for target-speaker extraction. Items: ``{"id", "mix" [time],
    "target" [time] (source 0), "interferer" [time] (sum of the others), "enroll" [time'],
    "enroll_mode"}``."""

    def __init__(self, utts, sample_rate, specs=None, n_items=0, n_src=2, snr_range=(-5, 5),
                 segment_seconds=4.0, speed_range=(0.9, 1.1), seed=0, enroll_seconds=3.0,
                 min_enroll_seconds=1.0):
        super().__init__(utts, sample_rate, specs, n_items, n_src, snr_range, segment_seconds,
                         speed_range, seed)
        self.enroll_kw = dict(enroll_seconds=enroll_seconds, min_enroll_seconds=min_enroll_seconds)

    def spec(self, i: int) -> ExtractionSpec:
        if self.specs is not None:
            return self.specs[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return draw_extraction_spec(rng, f"train_e{self.epoch}_{i}", self.speakers, self.by_speaker,
                                    **self.kw, **self.enroll_kw)

    def __getitem__(self, i):
        spec = self.spec(i)
        mix, sources = render_mixture(spec, self.utts, self.sample_rate)
        return _extraction_item(spec.id, mix, sources[:, 0], sources[:, 1:].sum(-1),
                                render_enrollment(spec, self.utts, self.sample_rate), spec.enroll_mode)


def read_extraction_list(path: str, folder: str | None = None):
    """Rows ``(id, mix_path, target_path, enroll_path, interferer_path or None)`` of a
    Libri2Mix-style TSE list: a CSV with columns ``mixture_path``, ``target_path`` (or
    ``source_1_path``), ``enrollment_path`` (or ``enroll_path``), optional ``mixture_ID`` and
    ``interferer_path`` (or ``source_2_path``). Relative paths are taken from the CSV's folder
    (or ``folder``). Returns ``(rows, missing)``."""
    base = folder or os.path.dirname(os.path.abspath(path))

    def col(r, *names):
        return next((r[n] for n in names if r.get(n)), None)

    rows, missing = [], []
    with open(path) as f:
        for k, r in enumerate(csv.DictReader(f)):
            paths = [col(r, "mixture_path", "mix_path"), col(r, "target_path", "source_1_path"),
                     col(r, "enrollment_path", "enroll_path")]
            if None in paths:
                raise ValueError(f"{path}: row {k + 1} lacks mixture_path, target_path or "
                                 "enrollment_path (columns found: " + ", ".join(r) + ")")
            other = col(r, "interferer_path", "source_2_path")
            paths = [_resolve(p, base) for p in paths] + [_resolve(other, base) if other else None]
            absent = [p for p in paths if p and not os.path.exists(p)]
            if absent:
                missing.append(f"{path}: row {k + 1}: missing {absent[0]}")
                continue
            rows.append((col(r, "mixture_ID", "id") or f"{os.path.basename(path)}_{k:05d}", *paths))
    return rows, missing


class FileExtractionDataset(FileMixtureDataset):
    """TSE examples listed by :func:`read_extraction_list`. Training (``segment_seconds``): the
    same random crop of mixture, target and interferer, and a random crop of at most
    ``enroll_seconds`` of the enrolment; evaluation: whole files (enrolment capped likewise, from
    its start). Without an interferer file the interferer is ``mixture - target``."""

    def __init__(self, rows, sample_rate, segment_seconds=None, seed=0, enroll_seconds=3.0):
        super().__init__(rows, sample_rate, segment_seconds, seed)
        self.enroll_seconds = enroll_seconds

    def _crop(self, path, seconds, rng):
        frames, sr, _ = audio_info(path)
        start, stop = 0, None
        if seconds and frames > int(seconds * sr):
            need = int(seconds * sr)
            start = int(rng.integers(0, frames - need + 1)) if rng is not None else 0
            stop = start + need
        return start, stop

    def __getitem__(self, i):
        uid, mix_path, target_path, enroll_path, other_path = self.rows[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.segment_seconds else None
        start, stop = self._crop(mix_path, self.segment_seconds, rng)
        sigs = []
        for p in [mix_path, target_path] + ([other_path] if other_path else []):
            x, sr = read_audio(p, start=start, stop=stop)
            sigs.append(resample(x, sr, self.sample_rate))
        n = min(len(s) for s in sigs)
        mix, target = sigs[0][:n], sigs[1][:n]
        interferer = sigs[2][:n] if other_path else mix - target
        e_start, e_stop = self._crop(enroll_path, self.enroll_seconds, rng)
        enroll, sr = read_audio(enroll_path, start=e_start, stop=e_stop)
        return _extraction_item(uid, mix, target, interferer, resample(enroll, sr, self.sample_rate),
                                "list")


class TSEData(SeparationData):
    """Train / valid / test sets for target-speaker extraction (same arguments as
    :class:`SeparationData`, plus the ones below). Source 0 of each generated mixture is the
    target; valid/test lists are fixed by the seed.

    Arguments
    ---------
    enroll_seconds : float
        Longest enrolment crop.
    min_enroll_seconds : float
        Shortest enrolment cut from the target's own utterance (single-utterance speakers).
    tse_lists : str or dict, optional
        Libri2Mix-style TSE lists instead of a corpus (:func:`read_extraction_list`): a folder
        holding ``train.csv``, ``valid.csv`` (or ``dev.csv``) and ``test.csv``, or a dict
        ``{train: csv, valid: csv, test: csv}``.
    """

    def __init__(self, *args, enroll_seconds=3.0, min_enroll_seconds=1.0, tse_lists=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.enroll_seconds, self.min_enroll_seconds = enroll_seconds, min_enroll_seconds
        self.tse_lists = tse_lists
        if tse_lists:
            self.kind = "tse_lists"

    def _draw_spec(self, rng, mix_id, speakers, by_speaker, segment_seconds=None):
        return draw_extraction_spec(rng, mix_id, speakers, by_speaker, self.n_src, self.sample_rate,
                                    self.snr_range, segment_seconds=segment_seconds,
                                    max_seconds=self.eval_max_seconds,
                                    enroll_seconds=self.enroll_seconds,
                                    min_enroll_seconds=self.min_enroll_seconds)

    def _mixtures(self, utts, **kwargs):
        return ExtractionDataset(utts, self.sample_rate, enroll_seconds=self.enroll_seconds,
                                 min_enroll_seconds=self.min_enroll_seconds, **kwargs)

    def datasets(self):
        if self.kind == "tse_lists":
            return self._listed()
        if self.kind in ("librimix", "wsj0mix"):
            raise ValueError(f"{self.data_folder} holds {self.kind} separation mixtures, which name "
                             "no enrolment: give `tse_lists` (CSV of mixture, target, enrollment) or "
                             "a single-speaker corpus for on-the-fly mixtures")
        sets = super().datasets()
        for split in SPLITS:
            counts = {}
            for u in sets[split].utts.values():
                counts[u.speaker] = counts.get(u.speaker, 0) + 1
            single = sum(1 for c in counts.values() if c == 1)
            how = ("a different utterance of the target speaker" if not single else
                   "a crop of the target's own utterance, not overlapping the target crop"
                   if single == len(counts) else
                   f"another utterance, or for the {single} single-utterance speakers a crop of the "
                   "target's own utterance not overlapping the target crop")
            logger.info("%s enrolment: %s (%d speakers)", split, how, len(counts))
        return sets

    def _listed(self):
        lists = self.tse_lists
        if isinstance(lists, str):
            names = {"train": ["train.csv"], "valid": ["valid.csv", "dev.csv"], "test": ["test.csv"]}
            lists = {s: next((os.path.join(lists, n) for n in names[s]
                              if os.path.exists(os.path.join(lists, n))), None) for s in SPLITS}
        rows = {}
        for s in SPLITS:
            if not lists.get(s) or not os.path.exists(lists[s]):
                raise FileNotFoundError(f"no {s} TSE list in {self.tse_lists} (expected {s}.csv)")
            rows[s], missing = read_extraction_list(lists[s])
            self.missing += missing
        for m in self.missing[:10]:
            logger.warning("skipping TSE example: %s", m)
        logger.info("enrolment: as listed in %s", self.tse_lists)
        kw = dict(enroll_seconds=self.enroll_seconds)
        return {"train": FileExtractionDataset(rows["train"], self.sample_rate, self.segment_seconds,
                                               self.seed, **kw),
                "valid": FileExtractionDataset(rows["valid"][: self.n_valid or None], self.sample_rate, **kw),
                "test": FileExtractionDataset(rows["test"], self.sample_rate, **kw)}


    def report(self, n_train_samples: int = 100) -> str:
        """:meth:`SeparationData.report` plus the enrolments: per split, how they were chosen,
        their lengths, the shortest gap between an enrolment cut from the target's own
        utterance and the target crop (must be > 0: they never overlap), and for TSE lists the
        rows whose enrolment is the target file itself."""
        if self.kind != "tse_lists":
            lines = [super().report(n_train_samples), "enrolments:"]
            sets = self.datasets()
            for s in SPLITS:
                ds = sets[s]
                specs = [ds.spec(i) for i in range(min(len(ds), n_train_samples) if s == "train"
                                                   else len(ds))]
                modes = {m: sum(sp.enroll_mode == m for sp in specs) for m in
                         sorted({sp.enroll_mode for sp in specs})}
                secs = np.array([sp.enroll_length / ds.utts[sp.enroll_utt].sample_rate for sp in specs])
                gaps = [_enroll_gap(sp, ds.utts[sp.utts[0]], self.sample_rate) for sp in specs
                        if sp.enroll_mode == "same-utterance"]
                gap = f"; closest to its target crop: {min(gaps)} samples" if gaps else ""
                lines.append(f"  {s:6} {len(specs):5d}: {modes}; {secs.mean():.2f} s mean "
                             f"({secs.min():.2f}-{secs.max():.2f}){gap}")
            return "\n".join(lines)
        sets = self.datasets()
        lines = [f"tse_lists: {self.tse_lists}; target rate {self.sample_rate} Hz",
                 f"{'split':6} {'rows':>6} {'mix hours':>9} {'enrol mean s':>12}  sample rates  "
                 "enrolment = target file"]
        for s in SPLITS:
            rows = sets[s].rows
            mixes = [audio_info(r[1]) for r in rows]
            enrols = [audio_info(r[3]) for r in rows]
            same = sum(os.path.realpath(r[2]) == os.path.realpath(r[3]) for r in rows)
            lines.append(f"{s:6} {len(rows):6d} {sum(f / sr for f, sr, _ in mixes) / 3600:9.3f} "
                         f"{np.mean([f / sr for f, sr, _ in enrols]) if rows else 0:12.2f}  "
                         f"{sorted({sr for _, sr, _ in mixes})}  {same}")
        lines.append(f"missing entries: {len(self.missing)}")
        lines += [f"  {m}" for m in self.missing[:20]]
        return "\n".join(lines)


def _enroll_gap(spec: ExtractionSpec, target: Utterance, sample_rate: int) -> int:
    """Samples of the target's utterance between its enrolment crop and its mixture crop."""
    used = math.ceil(spec.length * target.sample_rate * spec.speeds[0] / (100 * sample_rate))
    t0, t1 = spec.starts[0], spec.starts[0] + used
    e0, e1 = spec.enroll_start, spec.enroll_start + spec.enroll_length
    return max(t0 - e1, e0 - t1)


def main(argv=None):
    p = argparse.ArgumentParser(description="Report on a separation corpus (see modules/data.py).")
    p.add_argument("data_folder", nargs="?", default=None,
                   help="corpus folder; omit for the synthetic speech-like corpus")
    p.add_argument("--n_src", type=int, default=2)
    p.add_argument("--sample_rate", type=int, default=8000)
    p.add_argument("--speaker_pattern", default=None)
    p.add_argument("--save_folder", default="results/data_report")
    p.add_argument("--n_valid", type=int, default=40)
    p.add_argument("--n_test", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tse", action="store_true",
                   help="target-speaker extraction data (modules.data.TSEData): adds the enrolments")
    p.add_argument("--tse_lists", default=None,
                   help="folder of Libri2Mix-style TSE lists (train/valid/test.csv); implies --tse")
    a = p.parse_args(argv)
    kw = dict(save_folder=a.save_folder, n_src=a.n_src, sample_rate=a.sample_rate,
              speaker_pattern=a.speaker_pattern, n_valid=a.n_valid, n_test=a.n_test, seed=a.seed)
    if a.tse or a.tse_lists:
        data = TSEData(a.data_folder, tse_lists=a.tse_lists, **kw)
    else:
        data = SeparationData(a.data_folder, **kw)
    print(data.report())


if __name__ == "__main__":
    main()
