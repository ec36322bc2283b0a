"""Shared fixtures: paths, the real-speech folder (skipped when absent), tiny corpora."""

import os
import sys

import numpy as np
import pytest
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

def load_recipe(name: str):
    """The module ``recipes/<name>/train.py`` (its Brain class and ``run``), imported afresh."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_train", os.path.join(ROOT, "recipes", name, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHARED_DATA = os.environ.get("SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
LIBRISPEECH = os.path.join(SHARED_DATA, "LibriSpeech")
SPEECHOCEAN = os.path.join(SHARED_DATA, "speechocean762")


@pytest.fixture(scope="session")
def librispeech():
    """The real LibriSpeech excerpt of ../shared/data, or a skip saying why."""
    if not os.path.isdir(os.path.join(LIBRISPEECH, "train-clean-100")):
        pytest.skip(f"real speech not found at {LIBRISPEECH} (set SHARED_DATA to the folder "
                    "holding LibriSpeech/); this test needs it")
    return LIBRISPEECH


def write_tone_corpus(root, n_speakers=6, utts=2, sr=16000, seconds=1.5, layout="folders"):
    """A tiny corpus of per-speaker tones (distinct pitch per speaker), for pipeline tests."""
    rng = np.random.default_rng(0)
    for s in range(n_speakers):
        for u in range(utts):
            t = np.arange(int(seconds * sr)) / sr
            x = 0.3 * np.sin(2 * np.pi * (100 + 40 * s) * t) + 0.01 * rng.standard_normal(len(t))
            if layout == "librispeech":
                path = os.path.join(root, str(100 + s), "7", f"{100 + s}-7-{u:04d}.flac")
            else:
                path = os.path.join(root, f"spk{s}", f"utt{u}.wav")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sf.write(path, x.astype(np.float32), sr)
    return root


@pytest.fixture
def tone_corpus(tmp_path):
    return write_tone_corpus(str(tmp_path / "corpus"))


def inference_yaml(X=2, norm="gLN", extra=""):
    """hyperparams.yaml of a tiny Conv-TasNet model folder (N=16, L=16, B=16, H=32, Sc=16, R=1)."""
    return f"""
sample_rate: 8000
{extra}
model: !new:modules.models.convtasnet.ConvTasNet
    N: 16
    L: 16
    B: 16
    H: 32
    Sc: 16
    X: {X}
    R: 1
    norm: {norm}
modules:
    model: !ref <model>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <model>
"""


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One data-cache folder for the whole test session (named so as to shadow pytest's own
    ``cache`` fixture in every test file, not only where it is defined)."""
    return str(tmp_path_factory.mktemp("data_cache"))


def write_recorded_pieces(root, n_pieces=4, n_instruments=3, sample_rate=22050, seconds=3):
    """Pieces in the plain 'recorded' layout (<name>.wav + <name>.mid per instrument), rendered
    from a chorale so that notes and audio agree; at ``sample_rate`` to exercise resampling."""
    import pretty_midi

    from modules.data.music import Renderer, chorale_parts, make_example

    parts, renderer = chorale_parts("bach/bwv66.6"), Renderer(sample_rate)
    for k in range(n_pieces):
        ex = make_example(f"p{k}", parts, np.random.default_rng(k), n_instruments, sample_rate,
                          renderer, max_seconds=seconds)
        piece = os.path.join(str(root), f"piece{k}")
        os.makedirs(piece, exist_ok=True)
        for j, name in enumerate(ex.instruments):
            sf.write(os.path.join(piece, f"{name}.wav"), ex.stems[:, j].numpy(), sample_rate)
            pm = pretty_midi.PrettyMIDI()
            inst = pretty_midi.Instrument(program=40)
            inst.notes += [pretty_midi.Note(velocity=90, pitch=n.pitch, start=n.onset, end=n.offset)
                           for n in ex.notes[j]]
            pm.instruments.append(inst)
            pm.write(os.path.join(piece, f"{name}.mid"))
    return root
