"""Multi-instrument music with known stems and note labels, rendered offline from scores.

The four-part Bach chorales bundled with ``music21`` give the notes (soprano, alto, tenor, bass).
An example takes ``n`` of the parts of one chorale, gives each a different General-MIDI
instrument (flute, oboe, clarinet, bassoon, horn, violin, viola, cello, ...), transposes the
piece, picks a tempo, and renders every part separately with a SoundFont synthesiser
(``tinysoundfont``; default SoundFont: the TimGM6mb that ships inside ``pretty_midi``, or any
``.sf2`` the user points to, e.g. FluidR3 or MuseScore General, which are sampled from recorded
instruments). Each example gives the mixture, each instrument's stem and its notes
``(pitch, onset s, offset s)``. Chorales are split (disjoint) between train / valid / test.

A user folder of real recordings is also accepted (``stem_folder``): one folder per piece in the
URMP or Bach10 layout, or holding ``<name>.wav`` (the stem) and ``<name>.mid`` (its notes) per
instrument (:func:`scan_stem_folder`, :class:`StemFolderDataset`).

``tinysoundfont`` declares ``pyaudio``, which needs PortAudio headers to build; offline rendering
does not use it, so it is installed with ``--no-deps`` (see ``requirements-music.txt``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from modules.data.audio import audio_info, read_audio, resample
from modules.data.seeding import EpochSeeded

logger = logging.getLogger(__name__)

# General-MIDI programs (0-based) of the orchestral instruments used by default
INSTRUMENTS = {
    "flute": 73, "oboe": 68, "clarinet": 71, "bassoon": 70, "french horn": 60,
    "violin": 40, "viola": 41, "cello": 42, "trumpet": 56, "english horn": 69,
}
VOICES = ("Soprano", "Alto", "Tenor", "Bass")
# Seeds of the fixed sets, from the data seed: training draws from `seed` per epoch, validation
# from seed + VALID_SEED_OFFSET, the test set of n instruments from seed + TEST_SEED_OFFSET + n
# (apart from the validation seed for any n >= 0)
VALID_SEED_OFFSET = 1
TEST_SEED_OFFSET = 10


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


class ChoraleDataset(EpochSeeded, Dataset):
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

    def __len__(self):
        return self.n_items

    def example(self, i: int) -> MusicExample:
        if self._renderer is None:  # one synthesiser per worker process
            self._renderer = Renderer(self.sample_rate, self.soundfont)
        key = self.item_key(i, self.fixed)
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


@dataclass
class Stem:
    """One instrument of a recorded piece: its audio, the file of its notes and its name.
    ``notes`` is a MIDI file (all its notes), or a text file in a dataset's own format
    (``kind``: ``midi``, ``urmp``, ``bach10``); ``channel`` picks this instrument's notes in a
    file that holds several (Bach10)."""

    audio: str
    notes: str
    instrument: str
    kind: str = "midi"
    channel: int | None = None


# URMP (Li et al., IEEE Trans. Multimedia 2018): one folder per piece, ``AuSep_<k>_<abbr>_<piece>.wav``
# and ``Notes_<k>_<abbr>_<piece>.txt`` per track; the notes files hold one note per line: onset (s),
# pitch (Hz), duration (s), as read e.g. by public URMP fixture scripts.
URMP_INSTRUMENTS = {"vn": "violin", "va": "viola", "vc": "cello", "db": "double bass", "fl": "flute",
                    "ob": "oboe", "cl": "clarinet", "sax": "saxophone", "bn": "bassoon",
                    "tpt": "trumpet", "hn": "horn", "tbn": "trombone", "tba": "tuba"}
# Bach10 (Duan & Pardo 2011): one folder per piece, ``<piece>-<instrument>.wav`` per instrument
# and ``<piece>.txt``, the audio-aligned score: onset (ms), offset (ms), MIDI pitch, channel, the
# channel numbering the instruments in this order.
BACH10_INSTRUMENTS = ("violin", "clarinet", "saxphone", "bassoon")  # "saxphone": the files' spelling


def _rows(path: str, columns: int) -> np.ndarray:
    """The first ``columns`` numbers of each line of a whitespace-separated annotation file."""
    try:
        rows = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read its notes ({err})") from err
    if rows.size == 0:
        return np.zeros((0, columns))
    if rows.shape[1] < columns:
        raise ValueError(f"{path}: expected {columns} columns per note, found {rows.shape[1]}")
    return rows[:, :columns]


def read_stem_notes(stem: Stem) -> list:
    """The notes of ``stem`` in seconds, sorted by onset."""
    if stem.kind == "midi":
        return midi_notes(stem.notes)
    if stem.kind == "urmp":
        notes = [Note(int(round(69 + 12 * np.log2(hz / 440.0))), float(on), float(on + dur))
                 for on, hz, dur in _rows(stem.notes, 3) if hz > 0 and dur > 0]
    elif stem.kind == "bach10":
        notes = [Note(int(pitch), on / 1000.0, off / 1000.0)
                 for on, off, pitch, ch in _rows(stem.notes, 4)
                 if int(ch) == stem.channel and off > on]
    else:
        raise ValueError(f"{stem.notes}: unknown note file kind {stem.kind!r}")
    return sorted(notes, key=lambda n: (n.onset, n.pitch))


def _urmp_stems(piece: str) -> list:
    stems = []
    for audio in sorted(glob.glob(os.path.join(piece, "AuSep_*.wav"))):
        m = re.match(r"AuSep_(\d+)_([a-z]+)_(.+)\.wav$", os.path.basename(audio))
        if not m:
            continue
        notes = os.path.join(piece, f"Notes_{m.group(1)}_{m.group(2)}_{m.group(3)}.txt")
        if not os.path.exists(notes):
            logger.warning("%s has no %s beside it: skipped", audio, os.path.basename(notes))
            continue
        name = URMP_INSTRUMENTS.get(m.group(2), m.group(2))
        stems.append(Stem(audio, notes, f"{name} {m.group(1)}", kind="urmp"))
    return stems


def _bach10_stems(piece: str) -> list:
    name = os.path.basename(piece)
    score = os.path.join(piece, f"{name}.txt")
    stems = []
    for channel, inst in enumerate(BACH10_INSTRUMENTS, 1):
        audio = os.path.join(piece, f"{name}-{inst}.wav")
        if os.path.exists(audio):
            stems.append(Stem(audio, score, "saxophone" if inst == "saxphone" else inst,
                              kind="bach10", channel=channel))
    return stems if os.path.exists(score) else []


def _plain_stems(piece: str) -> list:
    stems = []
    for audio in sorted(glob.glob(os.path.join(piece, "*.wav")) + glob.glob(os.path.join(piece, "*.flac"))):
        base = audio.rsplit(".", 1)[0]
        midi = next((base + e for e in (".mid", ".midi") if os.path.exists(base + e)), None)
        if midi is None:
            logger.warning("%s has no %s.mid beside it: skipped", audio, os.path.basename(base))
            continue
        stems.append(Stem(audio, midi, os.path.basename(base)))
    return stems


def scan_stem_folder(folder: str) -> dict:
    """``{piece: [Stem, ...]}`` for a folder of pieces (one sub-folder each, two or more
    instruments). A piece folder is read in the first layout it matches:

    * URMP: ``AuSep_<k>_<abbr>_<piece>.wav`` + ``Notes_<k>_<abbr>_<piece>.txt`` per track;
    * Bach10: ``<piece>-violin.wav``, ``-clarinet.wav``, ``-saxphone.wav``, ``-bassoon.wav`` +
      the aligned score ``<piece>.txt``;
    * plain: ``<name>.wav`` (or .flac) + ``<name>.mid`` per instrument.

    Stems without notes are reported and skipped; mixture files (URMP ``AuMix_*``, Bach10
    ``<piece>.wav``) are not stems and are ignored."""
    pieces = {}
    for piece in sorted(d for d in glob.glob(os.path.join(folder, "*")) if os.path.isdir(d)):
        name = os.path.basename(piece)
        if glob.glob(os.path.join(piece, "AuSep_*.wav")):
            stems = _urmp_stems(piece)
        elif glob.glob(os.path.join(piece, f"{glob.escape(name)}-*.wav")):
            stems = _bach10_stems(piece)
        else:
            stems = _plain_stems(piece)
        if len(stems) >= 2:
            pieces[os.path.basename(piece)] = stems
    if not pieces:
        raise FileNotFoundError(f"no piece folder under {folder} holds two or more instruments "
                                "with notes (URMP, Bach10, or <name>.wav + <name>.mid per instrument)")
    return pieces


class StemFolderDataset(EpochSeeded, Dataset):
    """Examples cut from recorded pieces (:func:`scan_stem_folder`): ``n_instruments`` stems of
    one piece, an excerpt of at most ``max_seconds``, the stems resampled to ``sample_rate`` and
    kept at their recorded levels, the notes of each stem inside the excerpt. Fixed (``seed``,
    for valid/test) or drawn anew every epoch (training), like :class:`ChoraleDataset`."""

    def __init__(self, pieces: dict, n_items: int, n_instruments=2, sample_rate=16000, seed=0,
                 fixed=True, max_seconds=6.0):
        self.pieces = {k: v for k, v in pieces.items() if len(v) >= n_instruments}
        if not self.pieces:
            raise ValueError(f"no piece of this split has {n_instruments} instruments "
                             f"(pieces: {sorted(pieces)})")
        self.names = sorted(self.pieces)
        self.n_items, self.n_instruments, self.sample_rate = n_items, n_instruments, sample_rate
        self.seed, self.fixed, self.max_seconds, self.epoch = seed, fixed, max_seconds, 0
        self._notes = {}

    def __len__(self):
        return self.n_items

    def notes(self, stem: Stem) -> list:
        key = (stem.notes, stem.channel)
        if key not in self._notes:
            self._notes[key] = read_stem_notes(stem)
        return self._notes[key]

    def example(self, i: int) -> MusicExample:
        key = self.item_key(i, self.fixed)
        rng = np.random.default_rng(key)
        name = self.names[int(rng.integers(len(self.names)))]
        stems = [self.pieces[name][k] for k in
                 sorted(rng.choice(len(self.pieces[name]), self.n_instruments, replace=False).tolist())]
        infos = [audio_info(s.audio) for s in stems]
        seconds = min(frames / sr for frames, sr, _ in infos)
        start = float(rng.uniform(0, max(0.0, seconds - self.max_seconds)))
        span = min(self.max_seconds, seconds - start)
        length = int(span * self.sample_rate)
        audio, notes = [], []
        for stem, (_, sr, _) in zip(stems, infos):
            x, _ = read_audio(stem.audio, start=int(start * sr), stop=int((start + span) * sr))
            x = resample(x, sr, self.sample_rate)[:length]
            audio.append(torch.nn.functional.pad(x, (0, length - x.shape[0])))
            notes.append([Note(n.pitch, max(n.onset - start, 0.0), min(n.offset, start + span) - start)
                          for n in self.notes(stem) if n.offset > start and n.onset < start + span])
        audio = torch.stack(audio, 1)
        return MusicExample(f"{name}_{'-'.join(map(str, key))}", audio.sum(1), audio, notes,
                            [s.instrument for s in stems], self.sample_rate)

    def __getitem__(self, i):
        return self.example(i)


class ChoraleData:
    """The datasets of the timbre recipe (all options are yaml keys): training examples of
    ``train_instruments`` drawn anew each epoch, fixed validation examples, and fixed test sets
    of each count in ``test_instruments``, from chorale-disjoint splits."""

    def __init__(self, cache_folder="results/data_cache", sample_rate=16000, n_train=400, n_valid=20,
                 n_test=50, train_instruments=2, test_instruments=(2, 3), max_seconds=6.0,
                 seed=0, soundfont=None, max_chorales=None, valid_fraction=0.1, test_fraction=0.15,
                 instruments=None, stem_folder=None):
        self.cache_folder, self.sample_rate, self.seed = cache_folder, sample_rate, seed
        self.stem_folder = stem_folder
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
        if self.stem_folder:
            return self._recorded()
        chorales = load_chorales(self.cache_folder, self.max_chorales)
        split = split_pieces(list(chorales), *self.fractions, seed=self.seed)
        part = {s: {k: chorales[k] for k in names} for s, names in split.items()}
        logger.info("chorales: %s", {s: len(v) for s, v in part.items()})
        kw = dict(sample_rate=self.sample_rate, soundfont=self.soundfont, **self.example_kw)
        sets = {"train": ChoraleDataset(part["train"], self.n_train, self.train_instruments,
                                        seed=self.seed, fixed=False, **kw),
                "valid": ChoraleDataset(part["valid"], self.n_valid, self.train_instruments,
                                        seed=self.seed + VALID_SEED_OFFSET, **kw)}
        for n in self.test_instruments:
            sets[f"test{n}"] = ChoraleDataset(part["test"], self.n_test, n,
                                              seed=self.seed + TEST_SEED_OFFSET + n, **kw)
        return sets

    def _recorded(self) -> dict:
        """The same sets cut from the recorded pieces of ``stem_folder`` (split by piece)."""
        pieces = scan_stem_folder(self.stem_folder)
        split = split_pieces(list(pieces), *self.fractions, seed=self.seed)
        part = {s: {k: pieces[k] for k in names} for s, names in split.items()}
        logger.info("recorded pieces of %s: %s", self.stem_folder, {s: sorted(v) for s, v in part.items()})
        kw = dict(sample_rate=self.sample_rate, max_seconds=self.example_kw["max_seconds"])
        sets = {"train": StemFolderDataset(part["train"], self.n_train, self.train_instruments,
                                           seed=self.seed, fixed=False, **kw),
                "valid": StemFolderDataset(part["valid"], self.n_valid, self.train_instruments,
                                           seed=self.seed + VALID_SEED_OFFSET, **kw)}
        for n in self.test_instruments:
            if any(len(v) >= n for v in part["test"].values()):
                sets[f"test{n}"] = StemFolderDataset(part["test"], self.n_test, n,
                                                     seed=self.seed + TEST_SEED_OFFSET + n, **kw)
            else:
                logger.warning("no test piece has %d instruments: no test%d set", n, n)
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
