"""Corpus discovery: what a ``data_folder`` holds, its utterances and speakers, and the
speaker-disjoint train / valid / test split.

Kinds of ``data_folder`` (detected in this order, :func:`detect_corpus`):

* **WSJ0-2mix / WSJ0-3mix** as published: ``tr/``, ``cv/``, ``tt/``, each holding ``mix/``,
  ``s1/``, ``s2/`` (and ``s3/``) with the same file names.
* **LibriMix** as published: the ``metadata`` CSVs ``mixture_<split>_mix_clean.csv``.
* **A single-speaker corpus**: LibriSpeech layout ``<spk>/<chapter>/<spk>-<chapter>-<utt>.flac``,
  one folder per speaker (VCTK, AISHELL-3, speechocean762, ``<spk>/*.wav``), or a flat folder
  with a ``speaker_pattern`` regex whose first group is the speaker.

``data_folder`` may also be a list of single-speaker corpora (:func:`scan_corpora`): their
speakers are pooled, each named after its corpus so that two corpora cannot share a speaker.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np
from tqdm import tqdm

from modules.data.audio import AudioError, audio_info
from modules.data.published import find_librimix_csvs

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3")
LIBRISPEECH_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")
SPLITS = ("train", "valid", "test")
# a scan of at least this many files shows a progress bar
PROGRESS_FILES = 2000
# between a corpus name and a speaker or utterance name when several corpora are pooled
CORPUS_SEPARATOR = ":"


class CorpusKind(StrEnum):
    """What a data set is read from; decided once, when the data object is made."""

    SYNTHETIC = "synthetic"   # generated speech-like corpus (data_folder: null)
    SPEAKERS = "speakers"     # one or several single-speaker corpora, mixed on the fly
    LIBRIMIX = "librimix"     # published LibriMix mixtures
    WSJ0MIX = "wsj0mix"       # published WSJ0-2mix / -3mix mixtures
    TSE_LISTS = "tse_lists"   # Libri2Mix-style target-speaker lists (mixture, target, enrolment)


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


def folders_of(data_folder) -> list:
    """``data_folder`` as a list of folders: ``[]`` for None, ``[x]`` for one path."""
    if data_folder is None:
        return []
    if isinstance(data_folder, (str, os.PathLike)):
        return [str(data_folder)]
    return [str(f) for f in data_folder]


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
    for p in tqdm(paths, desc=f"scanning {os.path.basename(folder)}", unit="file",
                  disable=len(paths) < PROGRESS_FILES):
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


def corpus_names(folders) -> list:
    """A distinct short name per folder: its base name, numbered when two are alike."""
    bases = [os.path.basename(os.path.normpath(os.path.abspath(f))) for f in folders]
    return [b if bases.count(b) == 1 else f"{b}{k}" for k, b in enumerate(bases)]


def scan_corpora(folders, speaker_pattern: str | None = None, manifest_folder: str | None = None):
    """:func:`scan_corpus` over one or several folders. Returns ``(corpora, unreadable)`` with
    ``corpora = {name: [Utterance]}``.

    One folder keeps its speaker and utterance names (and the manifest ``manifest.json``).
    Several folders: each utterance's speaker and id are prefixed with its corpus name
    (``LibriSpeech:103``, ``speechocean762:1031``), so speakers of two corpora never merge;
    each corpus has its manifest ``manifest_<name>.json``.
    """
    folders = folders_of(folders)
    if len(folders) == 1:
        manifest = os.path.join(manifest_folder, "manifest.json") if manifest_folder else None
        utts, bad = scan_corpus(folders[0], speaker_pattern, manifest)
        return {corpus_names(folders)[0]: utts}, bad
    corpora, unreadable = {}, []
    for name, folder in zip(corpus_names(folders), folders):
        manifest = os.path.join(manifest_folder, f"manifest_{name}.json") if manifest_folder else None
        utts, bad = scan_corpus(folder, speaker_pattern, manifest)
        corpora[name] = [Utterance(f"{name}{CORPUS_SEPARATOR}{u.id}", u.path,
                                   f"{name}{CORPUS_SEPARATOR}{u.speaker}", u.frames, u.sample_rate)
                         for u in utts]
        unreadable += bad
    return corpora, unreadable


def group_by_speaker(utts) -> dict:
    """``{speaker: [Utterance, ...]}`` in the order of ``utts``."""
    by_speaker = {}
    for u in utts:
        by_speaker.setdefault(u.speaker, []).append(u)
    return by_speaker


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


def split_corpora(corpora: dict, valid_fraction=0.1, test_fraction=0.1, seed=0,
                  min_per_split=2) -> dict:
    """Utterances of each split, ``{"train": [...], "valid": [...], "test": [...]}``.

    Each corpus is split on its own (:func:`split_speakers`, same fractions and seed) and the
    splits are pooled, so a corpus's test speakers are the same whether it is used alone or with
    others: a model trained on several corpora can be tested on one of them alone, on speakers
    it has not heard.
    """
    out = {s: [] for s in SPLITS}
    for utts in corpora.values():
        split = split_speakers([u.speaker for u in utts], valid_fraction, test_fraction, seed,
                               min_per_split=min_per_split)
        for s, speakers in split.items():
            keep = set(speakers)
            out[s] += [u for u in utts if u.speaker in keep]
    return out


def detect_corpus(folder) -> CorpusKind:
    """The :class:`CorpusKind` of ``data_folder`` (a folder, a list of folders, or None)."""
    folders = folders_of(folder)
    if not folders:
        return CorpusKind.SYNTHETIC
    kinds = []
    for f in folders:
        if not os.path.isdir(f):
            raise FileNotFoundError(f"data_folder {f} is not a folder")
        if all(os.path.isdir(os.path.join(f, s, "mix")) for s in ("tr", "cv", "tt")):
            kinds.append(CorpusKind.WSJ0MIX)
        elif find_librimix_csvs(f):
            kinds.append(CorpusKind.LIBRIMIX)
        else:
            kinds.append(CorpusKind.SPEAKERS)
    if len(folders) > 1 and any(k != CorpusKind.SPEAKERS for k in kinds):
        mixed = [f"{f} ({k})" for f, k in zip(folders, kinds) if k != CorpusKind.SPEAKERS]
        raise ValueError(f"data_folder lists several folders, but {', '.join(mixed)} holds "
                         "published mixtures; only single-speaker corpora can be pooled: give a "
                         "published corpus alone")
    return kinds[0]
