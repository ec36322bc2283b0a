"""Rendered chorale data: notes, stems, splits, determinism; user stem + MIDI folders."""

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import write_recorded_pieces
from modules.data.music import (ChoraleDataset, Note, Renderer, chorale_parts, make_example, midi_notes,
                           scan_stem_folder, split_pieces)


@pytest.fixture(scope="module")
def parts():
    return chorale_parts("bach/bwv66.6")


@pytest.fixture(scope="module")
def renderer():
    return Renderer(16000)


def test_chorale_has_four_voices_in_range(parts):
    assert len(parts) == 4 and all(len(p) > 20 for p in parts)
    means = [np.mean([n.pitch for n in p]) for p in parts]
    assert means == sorted(means, reverse=True)  # soprano above alto above tenor above bass
    assert all(n.offset > n.onset for p in parts for n in p)


def test_rendered_stem_sounds_only_while_its_notes_play(renderer):
    notes = [Note(60, 0.2, 0.6), Note(67, 1.2, 1.5)]
    x = renderer.render(notes, program=73, length=32000)  # flute, 2 s
    assert x.shape == (32000,) and np.isfinite(x).all()
    rms = lambda a, b: float(np.sqrt(np.mean(x[int(a * 16000):int(b * 16000)] ** 2)))
    assert rms(0.0, 0.19) < 1e-4                      # before the first note
    assert rms(0.25, 0.55) > 100 * max(rms(0.0, 0.19), 1e-6)
    assert rms(1.25, 1.45) > 10 * rms(0.95, 1.15)       # second note vs the gap (release tail)


def test_example_is_the_sum_of_its_stems_and_reproducible(parts, renderer):
    a = make_example("a", parts, np.random.default_rng(3), 3, 16000, renderer, max_seconds=4)
    b = make_example("a", parts, np.random.default_rng(3), 3, 16000, renderer, max_seconds=4)
    assert a.stems.shape[1] == 3 and len(a.notes) == 3 and len(set(a.instruments)) == 3
    assert torch.allclose(a.mix, a.stems.sum(1))
    assert torch.equal(a.stems, b.stems) and a.instruments == b.instruments
    seconds = a.mix.shape[0] / 16000
    assert 0.5 < seconds <= 4.01
    for notes in a.notes:
        assert notes and all(0 <= n.onset < n.offset <= seconds + 1e-6 for n in notes)


def test_splits_are_disjoint_and_stable():
    names = [f"bwv{i}" for i in range(40)]
    s = split_pieces(names, seed=1)
    assert set(s["train"]) | set(s["valid"]) | set(s["test"]) == set(names)
    assert not set(s["train"]) & set(s["test"]) and not set(s["valid"]) & set(s["test"])
    assert s == split_pieces(list(reversed(names)), seed=1)


def test_dataset_fixed_vs_per_epoch(parts):
    chorales = {"bwv66.6": parts}
    fixed = ChoraleDataset(chorales, 2, n_instruments=2, seed=5, max_seconds=2)
    assert torch.equal(fixed[0].mix, fixed[0].mix)
    fixed.set_epoch(3)
    first = fixed[1].mix
    train = ChoraleDataset(chorales, 2, n_instruments=2, seed=5, fixed=False, max_seconds=2)
    train.set_epoch(1)
    e1 = train[1]
    train.set_epoch(2)
    e2 = train[1]
    assert torch.equal(first, fixed[1].mix)  # valid/test examples never change
    assert e1.id != e2.id


def test_user_folder_of_stems_and_midi(tmp_path):
    import pretty_midi

    piece = tmp_path / "01-piece"
    piece.mkdir()
    for name, pitch in (("violin", 72), ("cello", 48)):
        pm = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(program=40)
        inst.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=0.5, end=1.25))
        pm.instruments.append(inst)
        pm.write(str(piece / f"{name}.mid"))
        sf.write(piece / f"{name}.wav", np.zeros(16000, np.float32), 16000)
    sf.write(piece / "orphan.wav", np.zeros(100, np.float32), 16000)  # no MIDI: skipped
    pieces = scan_stem_folder(str(tmp_path))
    assert list(pieces) == ["01-piece"] and len(pieces["01-piece"]) == 2
    notes = midi_notes(str(piece / "violin.mid"))
    assert len(notes) == 1 and notes[0].pitch == 72
    assert notes[0].onset == pytest.approx(0.5, abs=1e-3) and notes[0].offset == pytest.approx(1.25, abs=1e-3)
    with pytest.raises(FileNotFoundError, match="two or more"):
        scan_stem_folder(str(piece))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return write_recorded_pieces(tmp_path_factory.mktemp("recorded"))


def test_recorded_pieces_give_excerpts_with_their_notes(recorded):
    from modules.data.music import StemFolderDataset

    pieces = scan_stem_folder(str(recorded))
    ds = StemFolderDataset(pieces, 6, n_instruments=2, sample_rate=16000, seed=3, max_seconds=1.5)
    for i in range(6):
        ex = ds[i]
        assert ex.stems.shape == (24000, 2) and torch.allclose(ex.mix, ex.stems.sum(1))
        assert all(0 <= n.onset < n.offset <= 1.5 + 1e-6 for notes in ex.notes for n in notes)
        # a stem sounds where its notes say: energy inside notes >> energy outside (rendered audio)
        for j, notes in enumerate(ex.notes):
            inside = torch.zeros(24000, dtype=torch.bool)
            for n in notes:
                inside[int(n.onset * 16000):int(n.offset * 16000)] = True
            x = ex.stems[:, j]
            if inside.all() or not inside.any():
                continue
            assert x[inside].pow(2).mean() > 4 * x[~inside].pow(2).mean()
    assert torch.equal(ds[2].mix, ds[2].mix)  # fixed examples are reproducible
    with pytest.raises(ValueError, match="4 instruments"):
        StemFolderDataset(pieces, 1, n_instruments=4)


def test_recipe_data_from_a_recorded_folder(recorded, tmp_path):
    from modules.data.music import ChoraleData, StemFolderDataset

    sets = ChoraleData(cache_folder=str(tmp_path), n_train=2, n_valid=1, n_test=2, max_seconds=1.0,
                       stem_folder=str(recorded), valid_fraction=0.25, test_fraction=0.25).datasets()
    assert set(sets) == {"train", "valid", "test2", "test3"}
    assert all(isinstance(d, StemFolderDataset) for d in sets.values())
    names = {s: set(d.names) for s, d in sets.items()}
    assert not names["train"] & names["test2"] and not names["train"] & names["valid"]
    assert sets["test3"][0].stems.shape == (16000, 3)


def test_urmp_and_bach10_layouts(tmp_path):
    """The two datasets' own layouts and note files: URMP notes in (onset s, Hz, duration s),
    Bach10's aligned score in (onset ms, offset ms, MIDI pitch, channel); mixtures ignored."""
    from modules.data.music import read_stem_notes

    silent = np.zeros(4800, np.float32)
    urmp = tmp_path / "urmp" / "01_Jupiter_vn_vc"
    urmp.mkdir(parents=True)
    for f in ("AuMix_01_Jupiter_vn_vc.wav", "AuSep_1_vn_01_Jupiter.wav", "AuSep_2_vc_01_Jupiter.wav",
              "AuSep_3_fl_01_Jupiter.wav"):  # track 3 has no notes file: skipped
        sf.write(urmp / f, silent, 48000)
    (urmp / "Notes_1_vn_01_Jupiter.txt").write_text("0.50\t440.0\t0.25\n1.00\t523.25\t0.5\n")
    (urmp / "Notes_2_vc_01_Jupiter.txt").write_text("0.25   130.81   1.0\n")
    pieces = scan_stem_folder(str(tmp_path / "urmp"))
    stems = pieces["01_Jupiter_vn_vc"]
    assert [s.instrument for s in stems] == ["violin 1", "cello 2"]
    notes = read_stem_notes(stems[0])
    assert [(n.pitch, n.onset, n.offset) for n in notes] == [(69, 0.5, 0.75), (72, 1.0, 1.5)]
    assert [n.pitch for n in read_stem_notes(stems[1])] == [48]

    bach = tmp_path / "bach10" / "01-AchGottundHerr"
    bach.mkdir(parents=True)
    for inst in ("", "-violin", "-clarinet", "-saxphone", "-bassoon"):
        sf.write(bach / f"01-AchGottundHerr{inst}.wav", silent, 44100)
    (bach / "01-AchGottundHerr.txt").write_text(
        "0\t1000\t67\t1\n0\t1000\t62\t2\n0\t500\t59\t3\n500\t1000\t57\t3\n0\t1000\t43\t4\n")
    stems = scan_stem_folder(str(tmp_path / "bach10"))["01-AchGottundHerr"]
    assert [s.instrument for s in stems] == ["violin", "clarinet", "saxophone", "bassoon"]
    sax = read_stem_notes(stems[2])
    assert [(n.pitch, n.onset, n.offset) for n in sax] == [(59, 0.0, 0.5), (57, 0.5, 1.0)]
    (bach / "01-AchGottundHerr.txt").write_text("0 1000 67\n")
    with pytest.raises(ValueError, match="expected 4 columns"):
        read_stem_notes(stems[0])
