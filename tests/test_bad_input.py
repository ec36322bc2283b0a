"""Every kind of input a user may feed the Separator, through the Python interface and the CLI.

The table below is the specification (docs/BAD_INPUT.md shows it too): each case writes a file, and
says whether it is separated (with the warning it must log, if any) or refused with an
AudioError whose message names the problem. No case may crash or silently give a wrong answer.
"""

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import inference_yaml
from modules.data.audio import AudioError
from modules.serving.inference import Separator
from modules.serving.separate import main as separate_main
from modules.models.convtasnet import ConvTasNet

MODEL_SR = 8000
RNG = np.random.default_rng(0)


def speechlike(seconds, sr, channels=1, peak=0.5):
    """Two amplitude-modulated harmonic tones (two 'speakers'), one column per channel."""
    t = np.arange(int(seconds * sr)) / sr
    a = np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    b = np.sin(2 * np.pi * 410 * t) * (1 + np.cos(2 * np.pi * 2 * t))
    x = np.stack([a + (0.5 + 0.1 * c) * b for c in range(channels)], 1)
    return (peak * x / np.abs(x).max()).astype(np.float32)


def write(path, x, sr, **kw):
    sf.write(path, x, sr, **kw)


def truncate(path, keep):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep] if keep > 0 else data[:len(data) // 2])


def _nan(path):
    x = speechlike(1, MODEL_SR)
    x[100] = np.nan
    write(path, x, MODEL_SR, subtype="FLOAT")


def _inf(path):
    x = speechlike(1, MODEL_SR)
    x[7] = np.inf
    write(path, x, MODEL_SR, subtype="FLOAT")


def _clipped(path):
    write(path, np.clip(3 * speechlike(1, MODEL_SR), -1, 1), MODEL_SR)


def _truncated_data(path):
    write(path, speechlike(1, MODEL_SR), MODEL_SR)
    truncate(path, 0)


def _truncated_header(path):
    write(path, speechlike(1, MODEL_SR), MODEL_SR)
    truncate(path, 30)


# name, file name, writer, expected: ("ok", seconds at the model rate, warning or None)
#                                     or ("error", text the message must contain)
CASES = [
    ("empty WAV (0 samples)", "empty.wav",
     lambda p: write(p, np.zeros((0, 1), np.float32), MODEL_SR), ("error", "no samples")),
    ("shorter than one encoder frame (10 samples)", "short.wav",
     lambda p: write(p, speechlike(1, MODEL_SR)[:10], MODEL_SR), ("error", "shorter than one encoder frame")),
    ("all-zero audio", "zeros.wav",
     lambda p: write(p, np.zeros((4000, 1), np.float32), MODEL_SR), ("ok", 0.5, "silent")),
    ("NaN samples (float WAV)", "nan.wav", _nan, ("error", "NaN/Inf")),
    ("Inf samples (float WAV)", "inf.wav", _inf, ("error", "NaN/Inf")),
    ("clipped audio (30 % of samples at full scale)", "clipped.wav", _clipped, ("ok", 1.0, "clipped")),
    ("8 kHz WAV (the model's rate)", "sr8000.wav",
     lambda p: write(p, speechlike(1, 8000), 8000), ("ok", 1.0, None)),
    ("22.05 kHz WAV", "sr22050.wav",
     lambda p: write(p, speechlike(1, 22050), 22050), ("ok", 1.0, None)),
    ("44.1 kHz WAV", "sr44100.wav",
     lambda p: write(p, speechlike(1, 44100), 44100), ("ok", 1.0, None)),
    ("48 kHz WAV", "sr48000.wav",
     lambda p: write(p, speechlike(1, 48000), 48000), ("ok", 1.0, None)),
    ("stereo WAV", "stereo.wav",
     lambda p: write(p, speechlike(1, MODEL_SR, channels=2), MODEL_SR), ("ok", 1.0, "2 channels")),
    ("6-channel WAV (5.1)", "six.wav",
     lambda p: write(p, speechlike(1, MODEL_SR, channels=6), MODEL_SR), ("ok", 1.0, "6 channels")),
    ("24-bit PCM WAV", "pcm24.wav",
     lambda p: write(p, speechlike(1, MODEL_SR), MODEL_SR, subtype="PCM_24"), ("ok", 1.0, None)),
    ("32-bit float WAV with peaks above 1.0 (not clipping)", "float.wav",
     lambda p: write(p, 3 * speechlike(1, MODEL_SR), MODEL_SR, subtype="FLOAT"), ("ok", 1.0, None)),
    ("FLAC", "flac.flac",
     lambda p: write(p, speechlike(1, 16000), 16000), ("ok", 1.0, None)),
    ("MP3 (libsndfile >= 1.1)", "mp3.mp3",
     lambda p: write(p, speechlike(1, 16000), 16000), ("ok", None, None)),
    ("OGG Vorbis", "ogg.ogg",
     lambda p: write(p, speechlike(1, 16000), 16000), ("ok", 1.0, None)),
    ("not audio (random bytes named .wav)", "garbage.wav",
     lambda p: open(p, "wb").write(RNG.bytes(500)), ("error", "cannot read")),
    ("WAV cut inside its header", "cut_header.wav", _truncated_header, ("error", "cannot read")),
    ("WAV cut inside its audio (interrupted copy)", "cut_data.wav", _truncated_data, ("ok", None, "truncated")),
    ("file does not exist", "missing.wav", lambda p: None, ("error", "cannot read")),
]


@pytest.fixture(scope="module")
def separator(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    model = ConvTasNet(N=16, L=16, B=16, H=32, Sc=16, X=2, R=1).eval()
    hub = base / "hub"
    hub.mkdir()
    torch.save(model.state_dict(), hub / "model.ckpt")
    (hub / "hyperparams.yaml").write_text(inference_yaml())
    return Separator.from_hparams(source=str(hub), savedir=str(base / "saved")), hub


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    for _, name, writer, _ in CASES:
        writer(str(folder / name))
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_interface(case, separator, inputs, tmp_path, caplog):
    sep, _ = separator
    _, name, _, expected = case
    path = str(inputs / name)
    if expected[0] == "error":
        with pytest.raises(AudioError, match=expected[1]) as err:
            sep.separate_file(path, output_dir=str(tmp_path))
        assert name in str(err.value)  # the message names the file
        assert not os.listdir(tmp_path)  # nothing half-written
        return
    _, seconds, warning = expected
    est = sep.separate_file(path, output_dir=str(tmp_path))
    assert est.shape[0] == 1 and est.shape[2] == 2 and torch.isfinite(est).all()
    if seconds is not None:
        assert abs(est.shape[1] - seconds * MODEL_SR) <= 1
    if warning:
        assert warning in caplog.text
    else:
        assert "WARNING" not in caplog.text, caplog.text
    stem = os.path.splitext(name)[0]
    for k in (1, 2):
        y, sr = sf.read(tmp_path / f"{stem}_source{k}.wav")
        assert sr == MODEL_SR and len(y) == est.shape[1] and np.abs(y).max() <= 0.99 + 1e-4
    if name == "zeros.wav":
        assert est.abs().max() == 0


def test_resampled_output_keeps_the_file_rate_and_length(separator, inputs):
    sep, _ = separator
    for rate in (22050, 44100, 48000):
        est = sep.separate_file(str(inputs / f"sr{rate}.wav"), resample_output=True)
        assert est.shape == (1, rate, 2)


def test_24bit_and_float_files_read_as_the_same_signal(separator, inputs):
    sep, _ = separator
    a = sep.separate_file(str(inputs / "pcm24.wav"))
    b = sep.separate_file(str(inputs / "sr8000.wav"))  # 16-bit PCM of the same signal
    assert (a - b).abs().max() < 1e-3


def test_multichannel_file_one_channel_on_request(separator, inputs):
    sep, _ = separator
    six = sep.separate_file(str(inputs / "six.wav"), channel=5)
    assert six.shape == (1, MODEL_SR, 2)
    with pytest.raises(AudioError, match="channel 6 asked but the file has 6 channels"):
        sep.separate_file(str(inputs / "six.wav"), channel=6)


def test_batch_interface_refuses_bad_tensors(separator):
    sep, _ = separator
    with pytest.raises(AudioError, match="NaN/Inf"):
        sep.separate_batch(torch.tensor([[0.0, float("nan")] * 100]))
    with pytest.raises(AudioError, match="shorter than one encoder frame"):
        sep.separate_batch(torch.randn(1, 3))
    with pytest.raises(AudioError, match="down-mix or pick a channel"):
        sep.separate_batch(torch.randn(1, 2, 100))


def test_cli_on_a_folder_of_every_case(separator, inputs, tmp_path, capsys):
    _, hub = separator
    out = tmp_path / "out"
    status = separate_main([str(inputs), "--model", str(hub), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1  # some files failed, and the exit status says so
    written = set(os.listdir(out))
    for _, name, _, expected in CASES:
        stem = os.path.splitext(name)[0]
        if not os.path.exists(inputs / name):
            continue  # the missing-file case has nothing in the folder to list
        if expected[0] == "ok":
            assert {f"{stem}_source1.wav", f"{stem}_source2.wav"} <= written, name
        else:
            assert f"FAILED {inputs / name}" in err and expected[1] in err, name
            assert not any(w.startswith(stem + "_") for w in written), name


def test_cli_list_file_names_a_missing_entry(separator, inputs, tmp_path, capsys):
    _, hub = separator
    listing = tmp_path / "list.txt"
    listing.write_text(f"{inputs / 'sr8000.wav'}\n{inputs / 'missing.wav'}\n")
    assert separate_main([str(listing), "--model", str(hub), "--out", str(tmp_path / "o")]) == 1
    assert "missing.wav" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "o" / "sr8000_source1.wav")
