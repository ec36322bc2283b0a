"""Data pipeline: corpus discovery, speaker-disjoint splits, exact mixing SNR, fixed sets,
resampling once per file, several corpora in one run."""

import csv
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, write_tone_corpus
from modules.data import resampled
from modules.data.audio import read_audio, resample
from modules.data.corpora import detect_corpus, scan_corpus, speaker_of, split_speakers
from modules.data.mixing import MixtureDataset, SeparationData, achieved_snrs, render_mixture
from modules.data.report import report
from modules.data.resampled import ModelRateAudio
from modules.data.synth import make_corpus, speaker_profile


def test_speaker_of_layouts():
    assert speaker_of("/x/LibriSpeech/train-clean-100/103/1240/103-1240-0000.flac") == "103"
    assert speaker_of("/x/VCTK/wav48/p225/p225_001.wav") == "p225"
    assert speaker_of("/x/recordings/3_jackson_12.wav", r"^\d+_([a-z]+)_\d+$") == "jackson"
    with pytest.raises(ValueError, match="does not match"):
        speaker_of("/x/a.wav", r"^(\d+)_")


def test_split_is_speaker_disjoint_and_seeded():
    spk = [f"s{i}" for i in range(50)]
    a = split_speakers(spk, 0.1, 0.1, seed=3)
    assert set(a["train"]) | set(a["valid"]) | set(a["test"]) == set(spk)
    assert not (set(a["train"]) & set(a["valid"])) and not (set(a["train"]) & set(a["test"]))
    assert not (set(a["valid"]) & set(a["test"]))
    assert len(a["test"]) == 5 and len(a["valid"]) == 5
    assert split_speakers(list(reversed(spk)), 0.1, 0.1, seed=3) == a
    assert split_speakers(spk, 0.1, 0.1, seed=4) != a
    with pytest.raises(ValueError, match="speakers"):
        split_speakers(["a", "b", "c"], min_per_split=2)


def test_scan_reports_unreadable_files(tone_corpus):
    with open(os.path.join(tone_corpus, "spk0", "broken.wav"), "wb") as f:
        f.write(b"RIFF....garbage")
    utts, bad = scan_corpus(tone_corpus)
    assert len(utts) == 12 and len({u.speaker for u in utts}) == 6
    assert len(bad) == 1 and "broken.wav" in bad[0]


@pytest.mark.parametrize("n_src", [2, 3])
def test_mixing_snr_is_exact_and_sources_sum_to_mixture(tmp_path, n_src):
    write_tone_corpus(str(tmp_path / "c"), n_speakers=10, layout="librispeech")
    data = SeparationData(str(tmp_path / "c"), save_folder=str(tmp_path / "s"),
                          cache_folder=str(tmp_path / "cache"), n_src=n_src,
                          sample_rate=8000, segment_seconds=1.0, snr_range=(-5, 5),
                          train_mixtures_per_epoch=20, n_valid=4, n_test=4,
                          valid_fraction=0.3, test_fraction=0.3)
    sets = data.datasets()
    for split in ("train", "valid", "test"):
        ds = sets[split]
        for i in range(len(ds)):
            spec = ds.spec(i)
            mix, src = render_mixture(spec, ds.utts, 8000)
            assert src.shape == (spec.length, n_src)
            assert torch.allclose(src.sum(-1), mix, atol=1e-6)
            assert np.allclose(achieved_snrs(src), spec.snrs_db, atol=1e-3)
            assert max(mix.abs().max(), src.abs().max()) <= 0.9 + 1e-6
            assert -5 <= min(spec.snrs_db) and max(spec.snrs_db) <= 5
            assert len({ds.utts[u].speaker for u in spec.utts}) == n_src  # distinct speakers
    train_spk = {u.speaker for u in sets["train"].utts.values()}
    test_spk = {u.speaker for u in sets["test"].utts.values()}
    assert not train_spk & test_spk


def test_valid_test_are_fixed_and_training_draws_per_epoch(tone_corpus, tmp_path):
    kw = dict(save_folder=str(tmp_path / "s"), cache_folder=str(tmp_path / "cache"),
              sample_rate=8000, segment_seconds=0.5,
              n_valid=3, n_test=3, train_mixtures_per_epoch=5, valid_fraction=0.34,
              test_fraction=0.34)
    a = SeparationData(tone_corpus, **kw).datasets()
    b = SeparationData(tone_corpus, **{**kw, "save_folder": str(tmp_path / "t")}).datasets()
    for split in ("valid", "test"):
        assert [a[split].spec(i) for i in range(3)] == [b[split].spec(i) for i in range(3)]
        assert torch.equal(a[split][1]["mix"], b[split][1]["mix"])
    train = a["train"]
    train.set_epoch(1)
    first = train[0]["mix"]
    assert torch.equal(first, train[0]["mix"])  # same epoch, same item
    train.set_epoch(2)
    assert not torch.equal(first, train[0]["mix"])
    assert first.shape == (4000,)  # 0.5 s at 8 kHz, after speed perturbation


def test_speed_perturbation_changes_duration(tone_corpus):
    utts, _ = scan_corpus(tone_corpus)
    ds = MixtureDataset(utts, 8000, n_items=1)
    spec = ds.spec(0)
    spec.speeds, spec.snrs_db, spec.starts, spec.length = [110, 90], [0.0, 0.0], [0, 0], 4000
    _, src = render_mixture(spec, ds.utts, 8000)
    # a tone at f played 10 % faster has frequency 1.1 f: count zero crossings
    u = ds.utts[spec.utts[0]]
    f0 = 100 + 40 * int(u.speaker[3:])
    x = src[:, 0].numpy()
    crossings = np.sum(np.abs(np.diff(np.sign(x))) > 0) / 2 / (len(x) / 8000)
    assert crossings == pytest.approx(1.1 * f0, rel=0.03)


def test_synthetic_corpus_is_deterministic_and_speakers_differ(tmp_path):
    a = make_corpus(str(tmp_path / "a"), seed=5, n_speakers=4, utts_per_speaker=2, progress=False)
    b = make_corpus(str(tmp_path / "b"), seed=5, n_speakers=4, utts_per_speaker=2, progress=False)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs
                   if f.endswith(".wav"))
    assert len(files) == 8
    for f in files:
        assert np.array_equal(sf.read(os.path.join(a, f))[0], sf.read(os.path.join(b, f))[0])
    f0s = [speaker_profile(5, s)["f0"] for s in range(4)]
    assert len(set(np.round(f0s, 1))) == 4
    x, sr = sf.read(os.path.join(a, files[0]))
    assert sr == 16000 and 2.0 < len(x) / sr < 5.5 and np.abs(x).max() <= 0.71


def _write_triplet(folder, name, sr=8000, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    s1, s2 = 0.1 * rng.standard_normal(n), 0.1 * rng.standard_normal(n)
    for sub, x in (("mix", s1 + s2), ("s1", s1), ("s2", s2)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        sf.write(os.path.join(folder, sub, name), x.astype(np.float32), sr)


def test_wsj0mix_folders(tmp_path):
    root = tmp_path / "wsj0-2mix" / "wav8k" / "min"
    for k, split in enumerate(("tr", "cv", "tt")):
        _write_triplet(str(root / split), f"a_{k}.wav", seed=k)
        _write_triplet(str(root / split), f"b_{k}.wav", seed=k + 10)
    os.remove(root / "tt" / "s2" / "b_2.wav")  # a missing source is reported, not fatal
    assert detect_corpus(str(root)) == "wsj0mix"
    data = SeparationData(str(root), sample_rate=8000, segment_seconds=0.25)
    sets = data.datasets()
    assert [len(sets[s]) for s in ("train", "valid", "test")] == [2, 2, 1]
    assert any("b_2.wav" in m for m in data.missing)
    item = sets["train"][0]
    assert item["mix"].shape == (2000,) and item["sources"].shape == (2000, 2)
    full = sets["test"][0]
    assert torch.allclose(full["sources"].sum(-1), full["mix"], atol=1e-4)


def test_librimix_metadata(tmp_path):
    root = tmp_path / "Libri2Mix"
    for split, name in (("train-100", "train"), ("dev", "dev"), ("test", "test")):
        base = root / "wav16k" / "min" / split
        _write_triplet(str(base), f"{name}_0.wav", sr=16000)
        meta = root / "wav16k" / "min" / "metadata"
        meta.mkdir(parents=True, exist_ok=True)
        with open(meta / f"mixture_{split}_mix_clean.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["mixture_ID", "mixture_path", "source_1_path", "source_2_path", "length"])
            # published CSVs hold the generating machine's absolute paths
            gen = f"/data/LibriMix/Libri2Mix/wav16k/min/{split}"
            w.writerow([f"{name}_0", f"{gen}/mix/{name}_0.wav", f"{gen}/s1/{name}_0.wav",
                        f"{gen}/s2/{name}_0.wav", 4000])
            w.writerow([f"{name}_gone", f"{gen}/mix/gone.wav", f"{gen}/s1/gone.wav",
                        f"{gen}/s2/gone.wav", 4000])
    assert detect_corpus(str(root)) == "librimix"
    data = SeparationData(str(root), sample_rate=8000, segment_seconds=None)
    sets = data.datasets()
    assert [len(sets[s]) for s in ("train", "valid", "test")] == [1, 1, 1]
    assert len(data.missing) == 3  # one missing row per split, reported
    item = sets["test"][0]
    assert item["mix"].shape == (2000,)  # resampled 16 kHz -> 8 kHz
    assert "librimix" in report(data)


def test_real_librispeech_split(librispeech, tmp_path):
    data = SeparationData(librispeech, save_folder=str(tmp_path), cache_folder=str(tmp_path),
                          n_test=4, n_valid=2,
                          train_mixtures_per_epoch=2)
    utts, bad = scan_corpus(librispeech)
    assert len({u.speaker for u in utts}) == 251 and not bad
    sets = data.datasets()
    spk = {s: {u.speaker for u in sets[s].utts.values()} for s in ("train", "valid", "test")}
    assert len(spk["train"]) + len(spk["valid"]) + len(spk["test"]) == 251
    assert not spk["train"] & spk["test"] and not spk["train"] & spk["valid"]
    item = sets["test"][0]
    assert item["sources"].shape[1] == 2 and item["mix"].abs().max() <= 0.9 + 1e-6


# ----------------------------------------------------------------------------- resampling once


def count_resampling(monkeypatch):
    """Count the file-rate resamplings of modules.data.resampled (speed perturbation, done
    by modules.data.mixing, is not one of them)."""
    calls = []

    def counted(x, orig_sr, new_sr):
        calls.append((orig_sr, new_sr))
        return resample(x, orig_sr, new_sr)

    monkeypatch.setattr(resampled, "resample", counted)
    return calls


@pytest.mark.parametrize("cached_on_disk", [True, False])
def test_a_file_is_resampled_once_over_epochs_and_crops(tmp_path, monkeypatch, cached_on_disk):
    write_tone_corpus(str(tmp_path / "c"), n_speakers=6, utts=2, sr=44100)
    calls = count_resampling(monkeypatch)
    cache = str(tmp_path / "cache") if cached_on_disk else None
    data = SeparationData(str(tmp_path / "c"), save_folder=str(tmp_path / "s"), cache_folder=cache,
                          sample_rate=16000, segment_seconds=0.5, train_mixtures_per_epoch=10,
                          n_valid=2, n_test=2, valid_fraction=0.34, test_fraction=0.34)
    sets = data.datasets()
    used = set()
    for epoch in range(3):
        sets["train"].set_epoch(epoch)
        for i in range(len(sets["train"])):
            item = sets["train"][i]
            assert item["mix"].shape == (8000,)
            used |= set(sets["train"].spec(i).utts)
    for split in ("valid", "test"):
        for i in range(len(sets[split])):
            sets[split][i]
            used |= set(sets[split].spec(i).utts)
    crops = 3 * 10 * 2 + 2 * 2 * 2
    assert len(used) <= 12 < crops
    assert len(calls) == len(used) and set(calls) == {(44100, 16000)}
    if cached_on_disk:  # a second run (or worker) reads the cache and resamples nothing
        again = SeparationData(str(tmp_path / "c"), save_folder=str(tmp_path / "s2"),
                               cache_folder=cache, sample_rate=16000, n_valid=2, n_test=2,
                               valid_fraction=0.34, test_fraction=0.34).datasets()
        assert torch.equal(again["test"][1]["mix"], sets["test"][1]["mix"])
        assert len(calls) == len(used)


def test_model_rate_audio_is_the_resampled_file(tmp_path):
    write_tone_corpus(str(tmp_path / "c"), n_speakers=1, utts=1, sr=44100)
    (u,), _ = scan_corpus(str(tmp_path / "c"))
    x, sr = read_audio(u.path)
    full = resample(x, sr, 16000)
    for audio in (ModelRateAudio(16000, str(tmp_path / "cache")), ModelRateAudio(16000)):
        assert torch.equal(audio.read(u), full)
        part = audio.read(u, 4410, 8820)  # 0.1 s to 0.2 s of the file
        assert torch.equal(part, full[1600:3200])


def test_speed_perturbation_of_a_44k_file(tmp_path):
    write_tone_corpus(str(tmp_path / "c"), sr=44100)
    utts, _ = scan_corpus(str(tmp_path / "c"))
    ds = MixtureDataset(utts, 16000, n_items=1)
    spec = ds.spec(0)
    spec.speeds, spec.snrs_db, spec.starts, spec.length = [110, 90], [0.0, 0.0], [0, 0], 16000
    _, src = render_mixture(spec, ds.utts, 16000, ds.audio)
    for k, speed in enumerate((1.1, 0.9)):
        f0 = 100 + 40 * int(ds.utts[spec.utts[k]].speaker[3:])
        x = src[:, k].numpy()
        crossings = np.sum(np.abs(np.diff(np.sign(x))) > 0) / 2 / (len(x) / 16000)
        assert crossings == pytest.approx(speed * f0, rel=0.03)


# ----------------------------------------------------------------------------- several corpora


def two_corpora(tmp_path, utts_b=2):
    """Two tone corpora whose speaker folders have the same names (spk0 .. spk5)."""
    a = write_tone_corpus(str(tmp_path / "A"), n_speakers=6, utts=1)
    b = write_tone_corpus(str(tmp_path / "B"), n_speakers=6, utts=utts_b, seconds=2.0)
    return a, b


def test_several_corpora_pool_their_speakers_without_collisions(tmp_path):
    a, b = two_corpora(tmp_path)
    kw = dict(cache_folder=str(tmp_path / "cache"), sample_rate=8000, segment_seconds=0.5,
              n_valid=4, n_test=4, train_mixtures_per_epoch=6, valid_fraction=0.34,
              test_fraction=0.34)
    data = SeparationData([a, b], save_folder=str(tmp_path / "s"), **kw)
    assert detect_corpus([a, b]) == "speakers"
    sets = data.datasets()
    spk = {s: {u.speaker for u in sets[s].utts.values()} for s in ("train", "valid", "test")}
    assert len(spk["train"] | spk["valid"] | spk["test"]) == 12  # spk0 of A is not spk0 of B
    assert not spk["train"] & spk["valid"] and not spk["train"] & spk["test"]
    assert not spk["valid"] & spk["test"]
    assert {s.split(":")[0] for s in spk["train"]} == {"A", "B"}
    # each corpus keeps the test speakers it has when used alone
    for folder, name in ((a, "A"), (b, "B")):
        alone = SeparationData(folder, save_folder=str(tmp_path / name), **kw).datasets()
        assert {f"{name}:{u.speaker}" for u in alone["test"].utts.values()} == \
            {s for s in spk["test"] if s.startswith(name + ":")}
    item = sets["train"][0]
    assert item["mix"].shape == (4000,) and item["sources"].shape == (4000, 2)
    assert "corpora: A (6 speakers, 6 utts), B (6 speakers, 12 utts)" in report(data, 4)


def test_published_mixtures_cannot_be_pooled(tmp_path):
    root = tmp_path / "wsj"
    for split in ("tr", "cv", "tt"):
        _write_triplet(str(root / split), "a.wav")
    a = write_tone_corpus(str(tmp_path / "A"))
    with pytest.raises(ValueError, match="only single-speaker corpora can be pooled"):
        SeparationData([a, str(root)])


def test_data_folder_list_from_the_command_line(tmp_path):
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    a, b = two_corpora(tmp_path)
    yaml = os.path.join(ROOT, "recipes", "separation", "hparams", "convtasnet-small.yaml")
    hparams_file, _, overrides = sb.parse_arguments(
        [yaml, f"--data_folder=[{a}, {b}]", f"--output_folder={tmp_path / 'out'}",
         f"--cache_folder={tmp_path / 'cache'}", "--n_valid=2", "--n_test=2"])
    with open(hparams_file) as f:
        hparams = load_hyperpyyaml(f, overrides)
    data = hparams["data"]
    assert data.folders == [a, b]
    sets = data.datasets()
    assert {u.speaker.split(":")[0] for u in sets["train"].utts.values()} == {"A", "B"}
