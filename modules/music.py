"""Multi-instrument music with known stems and note labels, rendered offline from scores.

The four-part Bach chorales bundled with ``music21`` give the notes (soprano, alto, tenor, bass).
An example takes ``n`` of the parts of one chorale, gives each a different General-MIDI
instrument (flute, oboe, clarinet, bassoon, horn, violin, viola, cello, ...), transposes the
piece, picks a tempo, and renders every part separately with a SoundFont synthesiser
(``tinysoundfont``; default SoundFont: the TimGM6mb that ships inside ``pretty_midi``, or any
``.sf2`` the user points to, e.g. FluidR3 or MuseScore General, which are sampled from recorded
instruments). Each example gives the mixture, each instrument's stem and its notes
``(pitch, onset s, offset s)``. Chorales are split (disjoint) between train / valid / test.

A user folder of real recordings is also accepted: one folder per piece holding, for every
instrument, ``<name>.wav`` (the stem) and ``<name>.mid`` (its notes), e.g. URMP or Bach10
renamed that way (:func:`scan_stem_folder`).

``tinysoundfont`` declares ``pyaudio``, which needs PortAudio headers to build; offline rendering
does not use it, so it is installed with ``--no-deps`` (see ``requirements-music.txt``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

# General-MIDI programs (0-based) of the orchestral instruments used by default
INSTRUMENTS = {
    "flute": 73, "oboe": 68, "clarinet": 71, "bassoon": 70, "french horn": 60,
    "violin": 40, "viola": 41, "cello": 42, "trumpet": 56, "english horn": 69,
}
VOICES = ("Soprano", "Alto", "Tenor", "Bass")


@dataclass
class Note:
    pitch: int        # MIDI number
    onset: float      # seconds (beats in a Chorale)
    offset: float


@dataclass
class MusicExample:
    id: str
    mix: torch.Tensor                 # [time]
    stems: torch.Tensor               # [time, n_instruments]
    notes: list                       # one list of Note per instrument
    instruments: list = field(default_factory=list)
    sample_rate: int = 16000


def default_soundfont() -> str:
    import pretty_midi

    path = os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: install pretty_midi or pass soundfont=<.sf2>")
    return path


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def chorale_parts(source) -> list:
    """The soprano, alto, tenor and bass notes of a music21 chorale, in beats (quarter notes):
    ``[[Note, ...] x 4]``, or None if the score does not have exactly those four voices."""
    from music21 import corpus

    score = corpus.parse(source) if isinstance(source, (str, os.PathLike)) else source
    by_name = {p.partName: p for p in score.parts}
    if len(score.parts) != 4 or set(by_name) != set(VOICES):
        return None
    parts = []
    for voice in VOICES:
        notes = []
        for n in by_name[voice].stripTies().flatten().notes:
            for p in getattr(n, "pitches", [n.pitch]):  # a chord (rare) gives several notes
                start = float(n.getOffsetInHierarchy(by_name[voice]))
                notes.append(Note(int(p.midi), start, start + float(n.quarterLength)))
        parts.append(sorted(notes, key=lambda x: (x.onset, x.pitch)))
    return parts


def load_chorales(cache_folder: str, limit: int | None = None) -> dict:
    """``{name: parts}`` of the four-voice Bach chorales of the music21 corpus (the first
    ``limit`` scores only, when given), parsed once and cached as JSON in ``cache_folder``
    (parsing all of them takes a few minutes)."""
    from music21 import corpus

    full = os.path.join(cache_folder, "bach_chorales.json")
    path = full if limit is None or os.path.exists(full) else os.path.join(
        cache_folder, f"bach_chorales_first{limit}.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        chorales = {k: [[Note(*n) for n in part] for part in v] for k, v in cached.items()}
    else:
        from tqdm import tqdm

        chorales = {}
        scores = sorted(corpus.getComposer("bach"), key=str)
        with tqdm(total=limit or len(scores), desc="parsing chorales", unit="score") as bar:
            for p in scores:
                if limit and len(chorales) >= limit:
                    break
                try:
                    parts = chorale_parts(p)
                except Exception as err:  # noqa: BLE001 - a score music21 cannot read is skipped
                    logger.warning("skipping %s: %s", p, err)
                    continue
                if parts and all(parts):
                    chorales[os.path.basename(str(p)).rsplit(".", 1)[0]] = parts
                    bar.update(1)
        os.makedirs(cache_folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump({k: [[[n.pitch, n.onset, n.offset] for n in part] for part in v]
                       for k, v in chorales.items()}, f)
    names = sorted(chorales)[:limit] if limit else sorted(chorales)
    return {k: chorales[k] for k in names}


def split_pieces(names, valid_fraction=0.1, test_fraction=0.1, seed=0, min_per_split=1) -> dict:
    """Piece-disjoint split ``{"train", "valid", "test"}`` depending only on ``seed`` and names."""
    names = sorted(names)
    if len(names) < 3 * min_per_split:
        raise ValueError(f"{len(names)} pieces cannot make disjoint train/valid/test splits")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test = max(min_per_split, round(test_fraction * len(names)))
    n_valid = max(min_per_split, round(valid_fraction * len(names)))
    return {"test": sorted(order[:n_test]), "valid": sorted(order[n_test:n_test + n_valid]),
            "train": sorted(order[n_test + n_valid:])}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


class Renderer:
    """Renders one instrument's notes to a mono waveform with a SoundFont."""

    def __init__(self, sample_rate: int = 16000, soundfont: str | None = None, tail: float = 0.5):
        import tinysoundfont

        self.sample_rate, self.tail = sample_rate, tail
        self.soundfont = soundfont or default_soundfont()
        if not os.path.exists(self.soundfont):
            raise FileNotFoundError(f"SoundFont {self.soundfont} not found")
        self.synth = tinysoundfont.Synth(samplerate=sample_rate)
        self.sfid = self.synth.sfload(self.soundfont)

    def render(self, notes, program: int, velocity: int = 90, length: int | None = None) -> np.ndarray:
        """``notes`` in seconds -> ``[length]`` float32 (default: last offset + ``tail``)."""
        sr, synth = self.sample_rate, self.synth
        synth.sounds_off()  # no voice of a previous render may ring into this one: silence
        synth.generate(sr)  # the synthesiser for a second, after which it renders reproducibly
        synth.program_select(0, self.sfid, 0, program)
        events = sorted([(round(n.onset * sr), 1, n.pitch) for n in notes]
                        + [(round(n.offset * sr), 0, n.pitch) for n in notes])  # offs first
        total = length or (max((e[0] for e in events), default=0) + int(self.tail * sr))
        out, now = [], 0
        for t, on, pitch in events:
            t = min(t, total)
            if t > now:
                out.append(np.frombuffer(synth.generate(t - now), dtype=np.float32))
                now = t
            if on:
                synth.noteon(0, pitch, velocity)
            else:
                synth.noteoff(0, pitch)
        if total > now:
            out.append(np.frombuffer(synth.generate(total - now), dtype=np.float32))
        synth.sounds_off()
        stereo = np.concatenate(out) if out else np.zeros(2 * total, np.float32)
        return stereo.reshape(-1, 2).mean(1)[:total].astype(np.float32)


def _in_seconds(part, bpm, start_beat, end_beat, transpose):
    spb = 60.0 / bpm
    notes = []
    for n in part:
        if n.offset <= start_beat or n.onset >= end_beat:
            continue
        on, off = max(n.onset, start_beat), min(n.offset, end_beat)
        notes.append(Note(n.pitch + transpose, (on - start_beat) * spb, (off - start_beat) * spb))
    return notes


def make_example(uid, parts, rng, n_instruments=2, sample_rate=16000, renderer=None,
                 instruments=None, tempo_range=(60, 100), transpose_range=(-3, 3),
                 max_seconds=6.0, level_range_db=(-3.0, 3.0)) -> MusicExample:
    """Draw one example from a chorale's ``parts`` (beats): which voices, which instruments,
    transposition, tempo, excerpt and levels all come from ``rng``."""
    renderer = renderer or Renderer(sample_rate)
    pool = list(instruments or INSTRUMENTS)
    voices = sorted(rng.choice(len(parts), size=n_instruments, replace=False).tolist())
    names = [pool[i] for i in rng.choice(len(pool), size=n_instruments, replace=False)]
    bpm = float(rng.uniform(*tempo_range))
    transpose = int(rng.integers(transpose_range[0], transpose_range[1] + 1))
    total_beats = max(n.offset for v in voices for n in parts[v])
    span = max_seconds * bpm / 60.0
    start = float(rng.uniform(0, max(0.0, total_beats - span)))
    start = float(np.floor(start))  # start on a beat
    end = min(total_beats, start + span)
    length = int(round((end - start) * 60.0 / bpm * sample_rate))
    stems, notes = [], []
    for v, name in zip(voices, names):
        part = _in_seconds(parts[v], bpm, start, end, transpose)
        x = renderer.render(part, INSTRUMENTS[name], length=length)
        rms = float(np.sqrt(np.mean(x ** 2))) if x.size else 0.0
        gain = 10 ** (rng.uniform(*level_range_db) / 20) * (0.1 / rms if rms > 1e-6 else 1.0)
        stems.append(torch.from_numpy(x * gain))
        notes.append(part)
    stems = torch.stack(stems, 1)
    return MusicExample(uid, stems.sum(1), stems, notes, names, sample_rate)


class ChoraleDataset(Dataset):
    """Examples rendered from chorales: fixed (``n_items`` drawn once from ``seed``, for
    valid/test) or drawn anew every epoch from ``(seed, epoch, index)`` (training)."""

    def __init__(self, chorales: dict, n_items: int, n_instruments=2, sample_rate=16000,
                 seed=0, fixed=True, soundfont=None, **example_kw):
        if not chorales:
            raise ValueError("no chorales for this split")
        self.chorales, self.names = chorales, sorted(chorales)
        self.n_items, self.n_instruments, self.sample_rate = n_items, n_instruments, sample_rate
        self.seed, self.fixed, self.example_kw, self.epoch = seed, fixed, example_kw, 0
        self.soundfont, self._renderer = soundfont, None

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n_items

    def example(self, i: int) -> MusicExample:
        if self._renderer is None:  # one synthesiser per worker process
            self._renderer = Renderer(self.sample_rate, self.soundfont)
        key = (self.seed, i) if self.fixed else (self.seed, self.epoch, i)
        rng = np.random.default_rng(key)
        name = self.names[int(rng.integers(len(self.names)))]
        return make_example(f"{name}_{'-'.join(map(str, key))}", self.chorales[name], rng,
                            self.n_instruments, self.sample_rate, self._renderer, **self.example_kw)

    def __getitem__(self, i):
        return self.example(i)


# --------------------------------------------------------------------------------------------
# User recordings: stem audio + MIDI pairs
# --------------------------------------------------------------------------------------------


def midi_notes(path: str) -> list:
    """Notes of every instrument of a MIDI file, in seconds (via pretty_midi)."""
    import pretty_midi

    pm = pretty_midi.PrettyMIDI(path)
    return sorted((Note(n.pitch, float(n.start), float(n.end)) for inst in pm.instruments
                   for n in inst.notes if not inst.is_drum), key=lambda n: (n.onset, n.pitch))


def scan_stem_folder(folder: str) -> dict:
    """``{piece: [(stem audio path, midi path), ...]}`` for a folder of pieces, each holding
    ``<name>.wav`` (or .flac) and ``<name>.mid`` per instrument. Stems without MIDI are
    reported and skipped."""
    pieces = {}
    for piece in sorted(d for d in glob.glob(os.path.join(folder, "*")) if os.path.isdir(d)):
        pairs = []
        for audio in sorted(glob.glob(os.path.join(piece, "*.wav")) + glob.glob(os.path.join(piece, "*.flac"))):
            stem = audio.rsplit(".", 1)[0]
            midi = next((stem + e for e in (".mid", ".midi") if os.path.exists(stem + e)), None)
            if midi is None:
                logger.warning("%s has no %s.mid beside it: skipped", audio, os.path.basename(stem))
                continue
            pairs.append((audio, midi))
        if len(pairs) >= 2:
            pieces[os.path.basename(piece)] = pairs
    if not pieces:
        raise FileNotFoundError(f"no piece folder under {folder} holds two or more "
                                "<name>.wav + <name>.mid pairs")
    return pieces


class ChoraleData:
    """The datasets of the timbre recipe (all options are yaml keys): training examples of
    ``train_instruments`` drawn anew each epoch, fixed validation examples, and fixed test sets
    of each count in ``test_instruments``, from chorale-disjoint splits."""

    def __init__(self, cache_folder="results/data_cache", sample_rate=16000, n_train=400, n_valid=20,
                 n_test=50, train_instruments=2, test_instruments=(2, 3), max_seconds=6.0,
                 seed=0, soundfont=None, max_chorales=None, valid_fraction=0.1, test_fraction=0.15,
                 instruments=None):
        self.cache_folder, self.sample_rate, self.seed = cache_folder, sample_rate, seed
        self.n_train, self.n_valid, self.n_test = n_train, n_valid, n_test
        self.train_instruments, self.test_instruments = train_instruments, tuple(test_instruments)
        self.soundfont, self.max_chorales = soundfont, max_chorales
        self.fractions = (valid_fraction, test_fraction)
        self.example_kw = {"max_seconds": max_seconds}
        if instruments:
            unknown = set(instruments) - set(INSTRUMENTS)
            if unknown:
                raise ValueError(f"unknown instruments {sorted(unknown)}; known: {sorted(INSTRUMENTS)}")
            self.example_kw["instruments"] = list(instruments)

    def datasets(self) -> dict:
        chorales = load_chorales(self.cache_folder, self.max_chorales)
        split = split_pieces(list(chorales), *self.fractions, seed=self.seed)
        part = {s: {k: chorales[k] for k in names} for s, names in split.items()}
        logger.info("chorales: %s", {s: len(v) for s, v in part.items()})
        kw = dict(sample_rate=self.sample_rate, soundfont=self.soundfont, **self.example_kw)
        sets = {"train": ChoraleDataset(part["train"], self.n_train, self.train_instruments,
                                        seed=self.seed, fixed=False, **kw),
                "valid": ChoraleDataset(part["valid"], self.n_valid, self.train_instruments,
                                        seed=self.seed + 1, **kw)}
        for n in self.test_instruments:
            sets[f"test{n}"] = ChoraleDataset(part["test"], self.n_test, n, seed=self.seed + 10 + n, **kw)
        return sets


class ExampleBatch:
    """A batch of MusicExample: ``mix [B, time]`` zero-padded, ``lengths`` in samples,
    ``examples`` (the stems and notes, unpadded)."""

    def __init__(self, examples):
        self.examples = examples
        self.id = [e.id for e in examples]
        self.lengths = torch.tensor([e.mix.shape[0] for e in examples])
        self.mix = torch.zeros(len(examples), int(self.lengths.max()))
        for i, e in enumerate(examples):
            self.mix[i, : e.mix.shape[0]] = e.mix

    def to(self, device):
        self.mix = self.mix.to(device)
        return self

    def pin_memory(self):
        return self
