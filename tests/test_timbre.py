"""Timbre model pieces: note-aligned front end, targets that match the audio, scoring, recipe."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, write_recorded_pieces
from modules.data.music import Renderer, chorale_parts, make_example
from modules.models.timbre import (NoteFrontEnd, TimbreNet, evaluate_example, midi_hz, note_f1,
                            roll_to_notes, semitone_filterbank, unit_targets)

SR = 16000


def tone(pitch, seconds=1.0, harmonics=1):
    t = torch.arange(int(seconds * SR)) / SR
    f0 = float(midi_hz(pitch))
    return sum(torch.sin(2 * torch.pi * h * f0 * t) / h for h in range(1, harmonics + 1))


def test_filterbank_rows_are_normalised_and_peak_at_their_pitch():
    fb = semitone_filterbank(SR, 2048, 28, 80)
    assert torch.allclose(fb.sum(1), torch.ones(80))
    freqs = torch.arange(1025) * SR / 2048
    peak_hz = freqs[fb.argmax(1)]
    centre = midi_hz(torch.arange(28, 108)).float()
    assert (torch.abs(peak_hz - centre) <= SR / 2048).all()


def test_pure_tone_lands_on_its_pitch_and_harmonics_stack_on_the_fundamental():
    fe = NoteFrontEnd()
    feats, units = fe(tone(69, harmonics=4)[None])            # A4 with 4 partials
    mag = units[0].abs().mean(-1)
    assert int(mag.argmax()) + fe.min_pitch == 69
    # channel of harmonic 2 (index of 2 in harmonics) at A4 holds the energy of A5 (its 2nd partial)
    h2 = fe.harmonics.index(2)
    p = 69 - fe.min_pitch
    assert torch.allclose(feats[0, h2, p], feats[0, fe.harmonics.index(1), p + 12])
    assert feats.shape[1] == fe.channels and torch.isfinite(feats).all()


def test_phase_feature_is_flat_for_a_tone_on_its_pitch():
    fe = NoteFrontEnd()
    feats, _ = fe(tone(60)[None])
    p = 60 - fe.min_pitch
    cos = feats[0, -2, p, 5:-5]
    assert cos.std() < 0.05  # constant phase advance: the expected one, up to the bin offset


@pytest.fixture(scope="module")
def example():
    parts = chorale_parts("bach/bwv66.6")
    return make_example("x", parts, np.random.default_rng(1), 2, SR, Renderer(SR), max_seconds=3)


def test_targets_match_the_audio(example):
    fe = NoteFrontEnd()
    tg = unit_targets(fe, example.stems, example.notes)
    mag = fe.units(example.mix[None])[0].abs()
    for i in range(2):
        on = tg["rolls"][i].bool()
        assert on.any()
        assert float((tg["owner"][on] == i).float().mean()) > 0.9   # a stem owns its notes
        assert mag[on].mean() > 3 * mag[~on].mean()                 # notes are where energy is
    n_notes = sum(len(part) for part in example.notes)
    assert 0.8 * n_notes <= tg["onsets"].sum() <= n_notes  # one onset unit per note (few coincide)


def test_roll_to_notes_round_trip_and_perfect_f1():
    fe = NoteFrontEnd()
    hop = fe.hop_length / SR
    roll = torch.zeros(80, 100, dtype=torch.bool)
    roll[32, 10:30] = True
    roll[44, 20:60] = True
    roll[50, 70:71] = True        # one frame: dropped
    notes = roll_to_notes(roll, hop, fe.min_pitch)
    assert [(n.pitch, round(n.onset / hop), round(n.offset / hop)) for n in notes] == \
        [(60, 10, 30), (72, 20, 60)]
    onsets = torch.zeros_like(roll)
    onsets[44, 40] = True         # a repeated note inside the second run
    split = roll_to_notes(roll, hop, fe.min_pitch, onsets=onsets)
    assert [(n.pitch, round(n.onset / hop), round(n.offset / hop)) for n in split] == \
        [(60, 10, 30), (72, 20, 40), (72, 40, 60)]
    assert note_f1(notes, notes)["onset_f1"] == 1.0 and note_f1(notes, [])["onset_f1"] == 0.0


def test_perfect_embeddings_score_as_the_oracle(example):
    fe = NoteFrontEnd()
    tg = unit_targets(fe, example.stems, example.notes)
    onehot = torch.nn.functional.one_hot(tg["owner"], 2).permute(2, 0, 1).float()
    out = {"note_logits": 20 * (tg["rolls"].amax(0) - 0.5), "embeddings": onehot,
           "onset_logits": 20 * (tg["onsets"].amax(0) - 0.5)}
    res = evaluate_example(out, tg, example.notes, fe)
    assert res["cluster_accuracy"] == 1.0
    assert res["instrument_onset_f1"] == pytest.approx(res["oracle_clusters_onset_f1"])
    assert res["agnostic_onset_f1"] > 0.9
    assert res["random_clusters_onset_f1"] < res["oracle_clusters_onset_f1"]


def test_model_shapes_and_gradients():
    model = TimbreNet(channels=16, blocks=2, emb_dim=8)
    out = model(torch.randn(2, SR))
    t = model.front_end.frames(SR)
    assert out["note_logits"].shape == (2, 80, t) and out["embeddings"].shape == (2, 8, 80, t)
    assert torch.allclose(out["embeddings"].norm(dim=1), torch.ones(2, 80, t), atol=1e-5)
    (out["note_logits"].mean() + out["onset_logits"].mean() + out["embeddings"][:, 0].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def run_recipe(out, *extra):
    """Run the timbre recipe on a few short examples with a small model."""
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "timbre", "train.py"),
           os.path.join(ROOT, "recipes", "timbre", "hparams", "timbre.yaml"),
           f"--output_folder={out}", f"--cache_folder={out.parent / 'cache'}", "--noprogressbar",
           "--max_chorales=12", "--n_train=4", "--n_valid=1", "--n_test=1", "--max_seconds=1.5",
           "--channels=16", "--blocks=2", "--n_examples=1", *extra]
    return out, subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    return run_recipe(tmp_path_factory.mktemp("timbre_debug") / "timbre", "--debug")


def test_recipe_debug_run(debug_run):
    out, proc = debug_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "test_summary.json").read_text())
    assert set(summary) >= {"test2", "test3"}
    for name in ("test2", "test3"):
        assert 0 <= summary[name]["instrument_onset_f1"] <= 1
        assert (out / f"{name}_results.csv").exists()
        assert len(os.listdir(out / "examples" / name)) == 1


def test_recipe_on_a_folder_of_recorded_pieces(tmp_path):
    """stem_folder replaces the chorales: the recipe trains and scores 2- and 3-instrument
    excerpts of the recorded pieces (split by piece)."""
    folder = write_recorded_pieces(tmp_path / "recorded")
    out, proc = run_recipe(tmp_path / "timbre", "--debug", f"--stem_folder={folder}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "recorded pieces of" in proc.stderr + proc.stdout
    summary = json.loads((out / "test_summary.json").read_text())
    assert summary["test2"]["n_examples"] == summary["test3"]["n_examples"] == 1


def test_export_round_trip(example, tmp_path, capsys):
    """modules.serving.export turns the run into a hub folder (with the run's sizes) that
    TimbreTranscriber loads and that computes what the run's best checkpoint computes."""
    from modules.serving.export import main as export_main
    from modules.training.brain import best_checkpoint
    from modules.serving.inference import TimbreTranscriber

    out, proc = run_recipe(tmp_path / "timbre", "--number_of_epochs=1")  # --debug saves no checkpoint
    assert proc.returncode == 0, proc.stderr[-3000:]
    hub = tmp_path / "hub"
    assert export_main([str(out), str(hub)]) == 0
    text = (hub / "hyperparams.yaml").read_text()
    assert re.search(r"^ +channels: 16$", text, re.M) and re.search(r"^ +blocks: 2$", text, re.M)
    card = (hub / "README.md").read_text()
    assert "TimbreTranscriber" in card and "| test2 | 1 |" in card and "| test3 | 1 |" in card
    tr = TimbreTranscriber.from_hparams(source=str(hub), savedir=str(tmp_path / "saved"))
    ckpt = os.path.join(best_checkpoint(str(out / "save"), "instrument_onset_f1"), "model.ckpt")
    model = TimbreNet(channels=16, blocks=2)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        want, got = model(example.mix[None]), tr.mods.model(example.mix[None])
    for key in ("note_logits", "onset_logits", "embeddings"):
        assert torch.equal(want[key], got[key]), key
    # TorchScript/ONNX deployment is for separation models: a clear refusal, the folder kept
    assert export_main([str(out), str(tmp_path / "hub2"), "--deploy"]) == 2
    assert "separation models only" in capsys.readouterr().err
    assert (tmp_path / "hub2" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def transcriber(tmp_path_factory):
    from modules.serving.inference import TimbreTranscriber

    base = tmp_path_factory.mktemp("timbre_hub")
    text = open(os.path.join(ROOT, "hparams", "timbre.yaml")).read()
    text = text.replace("channels: 48", "channels: 16").replace("blocks: 6", "blocks: 2")
    hub = base / "hub"
    hub.mkdir()
    (hub / "hyperparams.yaml").write_text(text)
    torch.manual_seed(0)
    model = TimbreNet(channels=16, blocks=2)
    torch.save(model.state_dict(), hub / "model.ckpt")
    return TimbreTranscriber.from_hparams(source=str(hub), savedir=str(base / "saved")), hub, model


def test_transcriber_round_trip(transcriber, example, tmp_path):
    import soundfile as sf

    tr, _, model = transcriber
    path = tmp_path / "chorale.wav"
    sf.write(path, example.mix.numpy(), SR)
    r = tr.transcribe_file(str(path), n_instruments=2, output_dir=str(tmp_path / "out"))
    frames = model.front_end.frames(example.mix.shape[0])
    assert r["n_instruments"] == 2 and len(r["notes"]) == 2
    assert r["rolls"].shape == (2, 80, frames)
    assert not (r["rolls"][0] & r["rolls"][1]).any()       # a unit goes to one instrument
    assert r["audio"].shape == (example.mix.shape[0], 2)
    assert torch.allclose(r["audio"].sum(1), example.mix, atol=1e-4)  # masks sum to one
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == ["chorale_instrument1.mid", "chorale_instrument1.wav", "chorale_instrument2.mid",
                       "chorale_instrument2.wav", "chorale_rolls.png"]
    target = tr.transcribe_file(str(path), n_instruments=2, target=1)
    assert torch.allclose(target["audio"][:, 0], r["audio"][:, 1], atol=1e-6)
    assert torch.allclose(target["audio"].sum(1), example.mix, atol=1e-4)


def test_transcribe_cli(transcriber, example, tmp_path, capsys):
    import soundfile as sf

    from modules.serving.transcribe import main

    _, hub, _ = transcriber
    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "a.wav", example.mix.numpy(), SR)
    (folder / "broken.wav").write_bytes(b"nope")
    status = main([str(folder), "--model", str(hub), "--out", str(tmp_path / "out"), "--n_instruments=2"])
    assert status == 1 and "FAILED" in capsys.readouterr().err
    assert (tmp_path / "out" / "a_instrument2.mid").exists()
