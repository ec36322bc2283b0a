"""The command lines (modules.serving.separate / extract / transcribe): output names, reruns,
unwritable or missing folders, the wrong kind of model folder, list files and wav.scp, chunking
options; and the share of clipped samples that their clipping warning reports."""

import importlib.util
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import inference_yaml
from modules.data.audio import clipped_fraction, read_audio
from modules.models.convtasnet import ConvTasNet
from modules.serving import separate, transcribe
from modules.serving.inference import Separator, chunked_separation

SR = 8000


class LoggingSeparator(Separator):
    """A Separator subclass a model folder can name as its ``interface:``."""


def tone(seconds=0.5, f=(150, 410), seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * fk * t + rng.uniform(0, 6)) for fk in f) + 0.05 * rng.standard_normal(len(t))
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    hub = tmp_path_factory.mktemp("cli") / "hub"
    hub.mkdir()
    torch.manual_seed(0)
    model = ConvTasNet(N=16, L=16, B=16, H=32, Sc=16, X=2, R=1).eval()
    torch.save(model.state_dict(), hub / "model.ckpt")
    (hub / "hyperparams.yaml").write_text(inference_yaml())
    return hub


def folder_like(src, dst, yaml_text):
    """A model folder with ``src``'s weights and ``yaml_text`` as its hyperparams."""
    dst.mkdir()
    (dst / "model.ckpt").write_bytes((src / "model.ckpt").read_bytes())
    (dst / "hyperparams.yaml").write_text(yaml_text)
    return dst


@pytest.fixture
def calls(monkeypatch):
    """Every Separator.separate_file call the command line makes, with the instance's
    chunking and precision at the time."""
    seen = []
    original = Separator.separate_file

    def recording(self, path, *args, **kwargs):
        seen.append({"path": str(path), "chunk_seconds": self.chunk_seconds,
                     "overlap_seconds": self.overlap_seconds, "precision": self.precision,
                     "class": type(self)})
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(Separator, "separate_file", recording)
    return seen


def run(model, *args):
    return separate.main([*map(str, args), "--model", str(model)])


def test_same_file_name_in_two_folders_writes_two_sets_of_outputs(model_folder, tmp_path, capsys):
    inp = tmp_path / "in"
    for k, sub in enumerate(("a", "b")):
        (inp / sub).mkdir(parents=True)
        sf.write(inp / sub / "mix.wav", tone(seed=k), SR)
    out = tmp_path / "out"
    assert run(model_folder, inp, "--out", out) == 0
    sep = Separator.from_hparams(source=str(model_folder), savedir=str(tmp_path / "s"))
    for sub in ("a", "b"):
        expected = sep.separate_file(str(inp / sub / "mix.wav"), output_dir=str(tmp_path / "ref" / sub))
        written, _ = read_audio(str(out / sub / "mix_source1.wav"))
        reference, _ = read_audio(str(tmp_path / "ref" / sub / "mix_source1.wav"))
        assert expected.shape[1] == written.shape[0]
        assert torch.allclose(written, reference, atol=1e-4)  # each folder's own separation
    a, _ = read_audio(str(out / "a" / "mix_source1.wav"))
    b, _ = read_audio(str(out / "b" / "mix_source1.wav"))
    assert (a - b).abs().max() > 0.01

    # a list naming both: names relative to the folder that holds them all
    (tmp_path / "list.txt").write_text(f"{inp / 'a' / 'mix.wav'}\n{inp / 'b' / 'mix.wav'}\n")
    assert run(model_folder, tmp_path / "list.txt", "--out", tmp_path / "out2") == 0
    assert (tmp_path / "out2" / "a" / "mix_source2.wav").exists()
    assert (tmp_path / "out2" / "b" / "mix_source2.wav").exists()

    with pytest.raises(SystemExit):
        separate.main(["--help"])
    assert "b/mix.wav write <out>/a/mix_source1.wav and <out>/b/mix_source1.wav" in \
        " ".join(capsys.readouterr().out.split())


def test_two_inputs_with_one_name_are_refused_before_any_work(model_folder, tmp_path, capsys, calls):
    inp = tmp_path / "in"
    inp.mkdir()
    sf.write(inp / "mix.wav", tone(), SR)
    sf.write(inp / "mix.flac", tone(seed=1), SR)
    assert run(model_folder, inp, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "mix.flac" in err and "mix.wav" in err and "would both write" in err
    assert calls == [] and not (tmp_path / "out").exists()


def test_rerun_refuses_to_overwrite_unless_asked(model_folder, tmp_path, capsys, calls):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("x", "y"):
        sf.write(inp / f"{name}.wav", tone(), SR)
    out = tmp_path / "out"
    assert run(model_folder, inp / "x.wav", "--out", out) == 0
    (out / "x_source2.wav").write_bytes(b"kept")
    calls.clear()
    assert run(model_folder, inp, "--out", out) == 2  # y is new, x's outputs exist
    err = capsys.readouterr().err
    assert str(out / "x_source1.wav") in err and "--overwrite" in err
    assert calls == []                                   # nothing separated, not even y
    assert not (out / "y_source1.wav").exists() and (out / "x_source2.wav").read_bytes() == b"kept"
    assert run(model_folder, inp, "--out", out, "--overwrite") == 0
    assert len(calls) == 2 and (out / "y_source1.wav").exists()
    assert sf.info(str(out / "x_source2.wav")).frames == int(0.5 * SR)


def test_unwritable_out_is_refused_before_any_work(model_folder, tmp_path, capsys, calls):
    sf.write(tmp_path / "x.wav", tone(), SR)
    (tmp_path / "a_file").write_text("")
    assert run(model_folder, tmp_path / "x.wav", "--out", tmp_path / "a_file" / "out") == 2
    err = capsys.readouterr().err
    assert "cannot write to --out" in err and str(tmp_path / "a_file" / "out") in err
    assert calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(model_folder, tmp_path, capsys, calls):
    sf.write(tmp_path / "x.wav", tone(), SR)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        assert run(model_folder, tmp_path / "x.wav", "--out", tmp_path / "ro") == 2
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    assert "cannot write to --out" in capsys.readouterr().err and calls == []


def test_missing_model_folder_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "x.wav", tone(), SR)
    assert run("./exports/nowhere", "x.wav", "--out", "out") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model folder ./exports/nowhere does not exist" in err
    assert "Traceback" not in err and "repo" not in err.lower().replace("python -m", "")

    def unreachable(**kwargs):
        raise OSError("404 Client Error: Repository Not Found")

    # user/name reads as a Hub id: when the Hub has nothing, the error says the folder is missing
    monkeypatch.setattr(separate, "fetch", unreachable)
    assert run("exports/nowhere", "x.wav", "--out", "out") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Hugging Face repo exports/nowhere" in err
    assert "local folder, it does not exist" in err


def test_model_folder_of_another_kind_names_the_right_command(model_folder, tmp_path, capsys, calls):
    tse = folder_like(model_folder, tmp_path / "tse", inference_yaml(
        extra="interface: modules.serving.inference.TargetSpeakerExtractor"))
    sf.write(tmp_path / "x.wav", tone(), SR)
    assert run(tse, tmp_path / "x.wav", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "TargetSpeakerExtractor" in err and "python -m modules.serving.extract --mix" in err
    assert calls == []
    # a separation folder given to transcribe names the separation command
    assert transcribe.main([str(tmp_path / "x.wav"), "--model", str(model_folder),
                            "--out", str(tmp_path / "out")]) == 2
    assert "python -m modules.serving.separate" in capsys.readouterr().err
    # a subclass of the command's interface is what the folder is loaded through
    sub = folder_like(model_folder, tmp_path / "sub", inference_yaml(
        extra=f"interface: {__name__}.LoggingSeparator"))
    assert run(sub, tmp_path / "x.wav", "--out", tmp_path / "out") == 2  # outside code: refused
    assert "--trust_code" in capsys.readouterr().err and calls == []
    assert run(sub, tmp_path / "x.wav", "--out", tmp_path / "out", "--trust_code") == 0
    assert calls[0]["class"].__name__ == "LoggingSeparator"


def test_outside_code_needs_trust_code(model_folder, tmp_path, capsys):
    folder = folder_like(model_folder, tmp_path / "m", inference_yaml(
        extra="table: !new:collections.OrderedDict"))
    sf.write(tmp_path / "x.wav", tone(), SR)
    assert run(folder, tmp_path / "x.wav", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "collections.OrderedDict" in err and "--trust_code" in err
    assert not (tmp_path / "out" / "x_source1.wav").exists()
    assert run(folder, tmp_path / "x.wav", "--out", tmp_path / "out", "--trust_code") == 0
    assert (tmp_path / "out" / "x_source1.wav").exists()


def test_list_paths_are_relative_to_the_list_folder(model_folder, tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    (lists / "audio").mkdir(parents=True)
    sf.write(lists / "audio" / "x.wav", tone(), SR)
    (lists / "files.txt").write_text("audio/x.wav\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run(model_folder, "../lists/files.txt", "--out", "out") == 0
    assert (tmp_path / "elsewhere" / "out" / "x_source1.wav").exists()


def test_wav_scp(model_folder, tmp_path, capsys, calls):
    (tmp_path / "wav").mkdir()
    for name in ("a", "b", "with space"):
        sf.write(tmp_path / "wav" / f"{name}.wav", tone(), SR)
    scp = tmp_path / "wav.scp"
    scp.write_text("# utt-id path\n\nspk1-utt1 wav/a.wav\nspk2-utt7\twav/b.wav\n"
                   "wav/with space.wav\n")
    out = tmp_path / "out"
    assert run(model_folder, scp, "--out", out) == 0
    assert {"spk1-utt1_source1.wav", "spk2-utt7_source1.wav", "with space_source1.wav"} <= \
        set(os.listdir(out))
    assert [os.path.basename(c["path"]) for c in calls] == ["a.wav", "b.wav", "with space.wav"]

    calls.clear()
    scp.write_text("u1 wav/a.wav\nu2 sox wav/b.wav -t wav - |\n")
    assert run(model_folder, scp, "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "is a command" in err and calls == []
    scp.write_text("u1 wav/a.wav\nu1 wav/b.wav\n")
    assert run(model_folder, scp, "--out", tmp_path / "o3") == 2
    assert "'u1'" in capsys.readouterr().err and calls == []


def test_chunk_overlap_and_precision_from_the_command_line(model_folder, tmp_path, calls, capsys):
    x = tone(1.0)
    sf.write(tmp_path / "x.wav", x, SR)
    out = tmp_path / "out"
    assert run(model_folder, tmp_path / "x.wav", "--out", out, "--chunk_seconds", 0.25,
               "--overlap_seconds", 0.05, "--precision", "fp32") == 0
    assert calls[-1]["chunk_seconds"] == 0.25 and calls[-1]["overlap_seconds"] == 0.05
    sep = Separator.from_hparams(source=str(model_folder), savedir=str(tmp_path / "s"))
    whole = sep.separate_file(str(tmp_path / "x.wav"))[0]
    sep.chunk_seconds, sep.overlap_seconds = 0.25, 0.05
    sep.separate_file(str(tmp_path / "x.wav"), output_dir=str(tmp_path / "ref"))
    mix, _ = read_audio(str(tmp_path / "x.wav"))
    with torch.no_grad():
        chunked = chunked_separation(sep.mods.model, mix[None], 2000, 400)[0]
    assert (whole - chunked).abs().max() > 0.01 * chunked.abs().max()  # chunking makes a difference
    for k in (1, 2):
        written, _ = read_audio(str(out / f"x_source{k}.wav"))
        assert torch.equal(written, read_audio(str(tmp_path / "ref" / f"x_source{k}.wav"))[0])

    assert run(model_folder, tmp_path / "x.wav", "--out", out, "--overwrite", "--precision", "bf16") == 0
    assert calls[-1]["precision"] == "bf16" and calls[-1]["chunk_seconds"] == 10.0
    n_calls = len(calls)
    assert run(model_folder, tmp_path / "x.wav", "--out", out, "--overwrite",
               "--chunk_seconds", 1, "--overlap_seconds", 1) == 2
    assert "set --overlap_seconds below --chunk_seconds" in capsys.readouterr().err
    assert len(calls) == n_calls


def test_transcribe_names_and_reruns(tmp_path, capsys):
    from modules.models.timbre import TimbreNet

    hub = tmp_path / "hub"
    hub.mkdir()
    text = open(os.path.join(os.path.dirname(__file__), "..", "hparams", "timbre.yaml")).read()
    (hub / "hyperparams.yaml").write_text(
        text.replace("channels: 48", "channels: 16").replace("blocks: 6", "blocks: 2"))
    torch.manual_seed(0)
    torch.save(TimbreNet(channels=16, blocks=2).state_dict(), hub / "model.ckpt")
    sr = 16000
    t = np.arange(sr) / sr
    for sub, f in (("a", 220.0), ("b", 330.0)):
        (tmp_path / "in" / sub).mkdir(parents=True)
        sf.write(tmp_path / "in" / sub / "piece.wav", 0.3 * np.sin(2 * np.pi * f * t), sr)
    args = [str(tmp_path / "in"), "--model", str(hub), "--out", str(tmp_path / "out"),
            "--n_instruments", "1"]
    assert transcribe.main(args) == 0
    for sub in ("a", "b"):
        assert {"piece_instrument1.mid", "piece_instrument1.wav", "piece_rolls.png"} <= \
            set(os.listdir(tmp_path / "out" / sub))
    capsys.readouterr()
    assert transcribe.main(args) == 2
    assert "piece_" in capsys.readouterr().err


def test_clipped_fraction_counts_every_clipped_sample():
    n = 8000
    phase = 2 * np.pi * 150.3 * np.arange(n) / SR
    loud = 3 * np.sin(phase)
    clipped = np.clip(loud, -1, 1)
    share = float(np.mean(np.abs(loud) >= 1))  # about 78 % of the samples, in runs of ~20
    assert 0.7 < share < 0.85
    assert clipped_fraction(torch.tensor(clipped)) == pytest.approx(share, abs=3 / n)
    # a 16-bit file: +1 becomes 32767/32768
    pcm = np.round(clipped * 32767) / 32768
    assert clipped_fraction(torch.tensor(pcm)) == pytest.approx(share, abs=3 / n)
    # clipped on top only, at 0.6 of full scale; two channels, one of them not clipped
    top = np.minimum(np.sin(phase), 0.6)
    top_share = float(np.mean(np.sin(phase) >= 0.6))
    both = torch.tensor(np.stack([top, 0.5 * np.sin(2 * np.pi * 437.3 * np.arange(n) / SR)], 1))
    assert clipped_fraction(both) == pytest.approx(top_share / 2, abs=3 / n)
    # loud but smooth (float, peaks above 1): not clipped
    assert clipped_fraction(torch.tensor(loud)) < 3 / n
    assert clipped_fraction(torch.zeros(100)) == 0.0


def test_outputs_under_the_input_folder_are_not_read_as_inputs(model_folder, tmp_path, calls):
    sf.write(tmp_path / "x.wav", tone(), SR)
    assert run(model_folder, tmp_path, "--out", tmp_path / "separated") == 0
    assert run(model_folder, tmp_path, "--out", tmp_path / "separated", "--overwrite") == 0
    assert [os.path.basename(c["path"]) for c in calls] == ["x.wav", "x.wav"]
    assert sorted(os.listdir(tmp_path / "separated")) == [".model", "x_source1.wav", "x_source2.wav"]


@pytest.mark.skipif(importlib.util.find_spec("resemblyzer") is None, reason="resemblyzer not installed")
def test_extract_select_runs_separate_then_select_on_a_separation_folder(model_folder, tmp_path, capsys):
    from modules.serving import extract
    from modules.serving.select import SeparateThenSelect

    sf.write(tmp_path / "mix.wav", tone(1.0, (150, 410)), SR)
    sf.write(tmp_path / "enroll.wav", tone(1.0, (150,), seed=1), SR)
    # without --select a separation folder is the wrong kind of model, and the error says so
    assert extract.main(["--mix", str(tmp_path / "mix.wav"), "--enroll", str(tmp_path / "enroll.wav"),
                         "--model", str(model_folder), "--out", str(tmp_path / "a")]) == 2
    assert "python -m modules.serving.separate" in capsys.readouterr().err
    assert extract.main(["--mix", str(tmp_path / "mix.wav"), "--enroll", str(tmp_path / "enroll.wav"),
                         "--model", str(model_folder), "--out", str(tmp_path / "b"), "--select"]) == 0
    got = read_audio(str(tmp_path / "b" / "mix_target.wav"))[0]
    selector = SeparateThenSelect.from_separator(str(model_folder), savedir=str(tmp_path / "loaded"))
    want = selector.extract_file(str(tmp_path / "mix.wav"), str(tmp_path / "enroll.wav"))
    assert got.shape[-1] == want.shape[-1]
    # the file is the same signal, written at the mixture's level and polarity
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten().float(), dim=0)
    assert abs(float(cos)) > 0.999
