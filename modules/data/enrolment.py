"""Target-speaker extraction data: mixtures whose source 0 is the target, plus an enrolment
utterance of the target speaker.

:class:`TSEData` (the extraction recipes' ``data:`` object) builds the same speaker-disjoint
sets as :class:`~modules.data.mixing.SeparationData`, each mixture with an enrolment drawn by
:func:`draw_extraction_spec`: another utterance of the target speaker when the speaker has one,
else a crop of the target's own utterance that does not overlap the target crop. With several
corpora in ``data_folder`` this is decided per speaker (e.g. other-utterance enrolments for
speechocean762, same-utterance ones for the one-utterance LibriSpeech excerpt). It also reads
Libri2Mix-style TSE lists (:func:`read_extraction_list`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import asdict, dataclass

import torch

from modules.data.audio import audio_info, read_audio, resample
from modules.data.corpora import SPLITS, CorpusKind, group_by_speaker
from modules.data.mixing import (PEAK_RANGE, READ_MARGIN, FileMixtureDataset, MixSpec, MixtureDataset,
                                 SeparationData, draw_spec, render_mixture)
from modules.data.published import resolve_path
from modules.data.resampled import ModelRateAudio

logger = logging.getLogger(__name__)

# samples (of the utterance's own rate) left between the target crop and an enrolment cut from
# the same utterance: the target is read READ_MARGIN samples past its crop, for the filter of its
# speed perturbation, and that read stops short of the enrolment
ENROLL_GAP = READ_MARGIN


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


def draw_extraction_spec(rng, mix_id, speakers, by_speaker, n_src, sample_rate, snr_range,
                         segment_seconds=None, max_seconds=None, speed_range=(1.0, 1.0),
                         enroll_seconds=3.0, min_enroll_seconds=1.0, enroll_crops=0) -> ExtractionSpec:
    """:func:`draw_spec` + an enrolment of the target speaker (source 0).

    The enrolment is a crop of up to ``enroll_seconds`` of *another* utterance of the target
    speaker when there is one. Otherwise (one utterance per speaker, as the LibriSpeech excerpt)
    it is cut from the target's own utterance, before or after the target crop and not
    overlapping it: at least ``min_enroll_seconds`` (half the utterance if shorter), and the
    mixture is shortened when the rest of the utterance cannot hold the target crop.

    ``enroll_crops > 0`` draws each enrolment from that many fixed crops per utterance, each
    with its own fixed peak (another utterance: crops evenly spaced over it; the target's own
    utterance: its start or end, as without the option), so the same enrolments come again and
    a frozen speaker encoder computes each embedding once (its cache). 0: any crop, any peak.
    """
    spec = draw_spec(rng, mix_id, speakers, by_speaker, n_src, sample_rate, snr_range,
                     segment_seconds=segment_seconds, max_seconds=max_seconds, speed_range=speed_range)
    target = next(u for s in speakers for u in by_speaker[s] if u.id == spec.utts[0])
    others = [u for u in by_speaker[target.speaker] if u.id != target.id]
    want = int(round(enroll_seconds * target.sample_rate))
    if enroll_crops:
        crop = int(rng.integers(enroll_crops))
        lo, hi = PEAK_RANGE
        peak = lo + (hi - lo) * (crop + 0.5) / enroll_crops
    else:
        peak = float(rng.uniform(*PEAK_RANGE))
    if others:
        u = others[int(rng.integers(len(others)))]
        length = min(want, u.frames)
        if enroll_crops:
            start = (u.frames - length) * crop // max(enroll_crops - 1, 1)
        else:
            start = int(rng.integers(0, u.frames - length + 1))
        return ExtractionSpec(**asdict(spec), enroll_utt=u.id, enroll_start=start,
                              enroll_length=length, enroll_mode="other-utterance", enroll_peak=peak)
    frames, speed = target.frames, spec.speeds[0]

    def need(length):  # samples of the utterance that `length` output samples use
        return math.ceil(length * target.sample_rate * speed / (100 * sample_rate))

    length = min(want, frames - need(spec.length) - ENROLL_GAP)
    if length < min_enroll_seconds * target.sample_rate:  # too short for both: split it
        length = min(want, int(min_enroll_seconds * target.sample_rate), frames // 2)
    room = frames - length - ENROLL_GAP
    if need(spec.length) > room:
        spec.length = int(room * 100 * sample_rate / (target.sample_rate * speed))
        while spec.length > 1 and need(spec.length) > room:
            spec.length -= 1
    used = need(spec.length)
    if rng.random() < 0.5:  # enrolment first, target crop after it
        start, spec.starts[0] = 0, int(rng.integers(length + ENROLL_GAP, frames - used + 1))
    else:
        start, spec.starts[0] = frames - length, int(rng.integers(0, room - used + 1))
    return ExtractionSpec(**asdict(spec), enroll_utt=target.id, enroll_start=start,
                          enroll_length=length, enroll_mode="same-utterance", enroll_peak=peak)


def render_enrollment(spec: ExtractionSpec, utts: dict, sample_rate: int,
                      audio: ModelRateAudio | None = None) -> torch.Tensor:
    """The enrolment of ``spec`` at ``sample_rate`` (no speed perturbation), peak ``enroll_peak``;
    read through ``audio`` as :func:`~modules.data.mixing.render_mixture` reads its sources."""
    audio = audio if audio is not None else ModelRateAudio(sample_rate)
    u = utts[spec.enroll_utt]
    x = audio.read(u, spec.enroll_start, spec.enroll_start + spec.enroll_length)
    return x * (spec.enroll_peak / max(float(x.abs().max()), 1e-9))


def enroll_gap(spec: ExtractionSpec, target, sample_rate: int) -> int:
    """Samples of the target's utterance between its enrolment crop and its mixture crop."""
    used = math.ceil(spec.length * target.sample_rate * spec.speeds[0] / (100 * sample_rate))
    t0, t1 = spec.starts[0], spec.starts[0] + used
    e0, e1 = spec.enroll_start, spec.enroll_start + spec.enroll_length
    return max(t0 - e1, e0 - t1)


def _extraction_item(uid, mix, target, interferer, enroll, mode):
    return {"id": uid, "mix": mix, "target": target, "interferer": interferer, "enroll": enroll,
            "enroll_mode": mode}


class ExtractionDataset(MixtureDataset):
    """:class:`MixtureDataset` for target-speaker extraction. Items: ``{"id", "mix" [time],
    "target" [time] (source 0), "interferer" [time] (sum of the others), "enroll" [time'],
    "enroll_mode"}``."""

    def __init__(self, utts, sample_rate, specs=None, n_items=0, n_src=2, snr_range=(-5, 5),
                 segment_seconds=4.0, speed_range=(0.9, 1.1), seed=0, enroll_seconds=3.0,
                 min_enroll_seconds=1.0, audio=None, enroll_crops=0):
        super().__init__(utts, sample_rate, specs, n_items, n_src, snr_range, segment_seconds,
                         speed_range, seed, audio)
        self.enroll_kw = dict(enroll_seconds=enroll_seconds, min_enroll_seconds=min_enroll_seconds,
                              enroll_crops=enroll_crops)

    def spec(self, i: int) -> ExtractionSpec:
        if self.specs is not None:
            return self.specs[i]
        return draw_extraction_spec(self.item_rng(i), f"train_e{self.epoch}_{i}", self.speakers,
                                    self.by_speaker, **self.kw, **self.enroll_kw)

    def __getitem__(self, i):
        spec = self.spec(i)
        mix, sources = render_mixture(spec, self.utts, self.sample_rate, self.audio)
        enroll = render_enrollment(spec, self.utts, self.sample_rate, self.audio)
        return _extraction_item(spec.id, mix, sources[:, 0], sources[:, 1:].sum(-1), enroll,
                                spec.enroll_mode)


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
            paths = [resolve_path(p, base) for p in paths] + [resolve_path(other, base) if other else None]
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
        rng = self.item_rng(i) if self.segment_seconds else None
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
    enroll_crops : int
        Training enrolments come from this many fixed crops per utterance
        (:func:`draw_extraction_spec`); 0 (default): any crop. Valid and test sets are fixed
        lists either way.
    tse_lists : str or dict, optional
        Libri2Mix-style TSE lists instead of a corpus (:func:`read_extraction_list`): a folder
        holding ``train.csv``, ``valid.csv`` (or ``dev.csv``) and ``test.csv``, or a dict
        ``{train: csv, valid: csv, test: csv}``.
    """

    def __init__(self, *args, enroll_seconds=3.0, min_enroll_seconds=1.0, tse_lists=None,
                 enroll_crops=0, **kwargs):
        self.enroll_seconds = enroll_seconds
        self.enroll_crops = int(enroll_crops or 0)
        if self.enroll_crops < 0:
            raise ValueError(f"enroll_crops must be 0 (any crop) or a positive count, got {enroll_crops}")
        self.min_enroll_seconds = min_enroll_seconds
        self.tse_lists = tse_lists
        super().__init__(*args, **kwargs)

    def _corpus_kind(self) -> CorpusKind:
        return CorpusKind.TSE_LISTS if self.tse_lists else super()._corpus_kind()

    def _draw_spec(self, rng, mix_id, speakers, by_speaker, segment_seconds=None):
        return draw_extraction_spec(rng, mix_id, speakers, by_speaker, self.n_src, self.sample_rate,
                                    self.snr_range, segment_seconds=segment_seconds,
                                    max_seconds=self.eval_max_seconds,
                                    enroll_seconds=self.enroll_seconds,
                                    min_enroll_seconds=self.min_enroll_seconds)

    def _mixtures(self, utts, **kwargs):
        crops = self.enroll_crops if kwargs.get("specs") is None else 0  # fixed lists: as drawn
        return ExtractionDataset(utts, self.sample_rate, enroll_seconds=self.enroll_seconds,
                                 min_enroll_seconds=self.min_enroll_seconds, audio=self.audio,
                                 enroll_crops=crops, **kwargs)

    def datasets(self):
        if self.kind == CorpusKind.TSE_LISTS:
            return self._listed()
        if self.kind in (CorpusKind.LIBRIMIX, CorpusKind.WSJ0MIX):
            raise ValueError(f"{self.data_folder} holds {self.kind} separation mixtures, which name "
                             "no enrolment: give `tse_lists` (CSV of mixture, target, enrollment) or "
                             "a single-speaker corpus for on-the-fly mixtures")
        sets = super().datasets()
        for split in SPLITS:
            counts = {spk: len(us) for spk, us in group_by_speaker(sets[split].utts.values()).items()}
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
