"""Separate-then-select: a separator folder + the GE2E encoder pick the enrolment's speaker."""

import glob
import importlib.util
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from conftest import SPEECHOCEAN, inference_yaml, load_recipe
from modules.data.audio import resample
from modules.models.convtasnet import ConvTasNet
from modules.models.speaker import INSTALL_HINT
from modules.serving.select import SeparateThenSelect

SR = 8000  # the separator's rate; the speechocean762 files are at 16 kHz

pytestmark = pytest.mark.skipif(importlib.util.find_spec("resemblyzer") is None,
                                reason=f"resemblyzer not installed (`{INSTALL_HINT}`)")


class OracleSeparator(nn.Module):
    """A stand-in separation model that knows the sources of the mixtures it was built with:
    ``forward(mix [batch, time])`` returns the stored sources ``[batch, time, n_src]`` of the
    stored mixture most correlated with each input."""

    def __init__(self, n_mixtures: int, samples: int, n_src: int):
        super().__init__()
        self.register_buffer("mixtures", torch.zeros(n_mixtures, samples))
        self.register_buffer("sources", torch.zeros(n_mixtures, samples, n_src))

    def forward(self, mix):
        t = mix.shape[-1]
        k = (nn.functional.normalize(mix, dim=-1)
             @ nn.functional.normalize(self.mixtures[:, :t], dim=-1).T).argmax(-1)
        return self.sources[k, :t]


def speech(speaker, utt):
    """Utterance ``utt`` of a speechocean762 speaker, at ``SR``."""
    files = sorted(glob.glob(os.path.join(SPEECHOCEAN, speaker, "*.flac")))
    return resample(torch.from_numpy(sf.read(files[utt], dtype="float32")[0]), 16000, SR)


@pytest.fixture
def oracle_folder(tmp_path):
    """Two 0-dB mixtures of speakers A and B (different utterances), their sources stored in
    opposite orders, and an enrolment of each speaker from a third utterance."""
    if not os.path.isdir(SPEECHOCEAN):
        pytest.skip(f"speechocean762 not found at {SPEECHOCEAN} (set SHARED_DATA)")
    # two adult women whose voices are close (d-vector cosine about 0.7 across utterances)
    a, b = "0024", "0036"
    pairs = [(speech(a, 0), speech(b, 0)), (speech(b, 1), speech(a, 1))]
    n = min(len(x) for pair in pairs for x in pair)
    sources = torch.stack([torch.stack([x[:n] / x[:n].std(), y[:n] / y[:n].std()], -1)
                           for x, y in pairs])                           # [2, n, 2]
    model = OracleSeparator(2, n, 2)
    model.mixtures.copy_(sources.sum(-1))
    model.sources.copy_(sources)
    folder = tmp_path / "oracle"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model.ckpt")
    (folder / "hyperparams.yaml").write_text(f"""
sample_rate: {SR}
model: !new:test_select.OracleSeparator
    n_mixtures: 2
    samples: {n}
    n_src: 2
modules:
    model: !ref <model>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <model>
""")
    enroll = {a: speech(a, 2), b: speech(b, 2)}
    return folder, sources, enroll, (a, b)


def test_selection_picks_the_enrolled_speaker(oracle_folder, tmp_path):
    folder, sources, enroll, (a, b) = oracle_folder
    tse = SeparateThenSelect.from_separator(str(folder), savedir=str(tmp_path / "saved"),
                                            trust_code=True)
    assert tse.sample_rate == SR and tse.encoder.sample_rate == SR
    mix = sources.sum(-1)
    # speaker A is source 0 of mixture 0 and source 1 of mixture 1; B the other way round
    for who, want in ((a, [0, 1]), (b, [1, 0])):
        e = enroll[who]
        target, scores, choice = tse.select_batch(mix, torch.stack([e, e]))
        assert choice.tolist() == want, scores
        assert torch.equal(target, sources[torch.arange(2), :, torch.tensor(want)])
    # ragged enrolments and mixtures; zero beyond each mixture's length
    e_a, e_b = enroll[a], enroll[b][: len(enroll[b]) // 2]
    enr = torch.nn.utils.rnn.pad_sequence([e_a, e_b], batch_first=True)
    short = sources.shape[1] - SR // 2
    mix_lens = torch.tensor([1.0, short / sources.shape[1]])
    est = tse.extract_batch(mix, enr, mix_lens, torch.tensor([len(e_a), len(e_b)]) / enr.shape[-1])
    assert torch.equal(est[0], sources[0, :, 0])
    assert torch.equal(est[1, :short], sources[1, :short, 0]) and not est[1, short:].any()


def test_extract_file_resamples_and_writes(oracle_folder, tmp_path):
    folder, sources, enroll, (a, b) = oracle_folder
    tse = SeparateThenSelect.from_separator(str(folder), trust_code=True)
    mix_path, enroll_path = tmp_path / "mix.wav", tmp_path / "enroll_b.wav"
    mix16 = resample(sources[1].sum(-1), SR, 16000)
    sf.write(mix_path, (0.05 * mix16).numpy(), 16000, subtype="FLOAT")
    sf.write(enroll_path, resample(enroll[b], SR, 16000).numpy(), 16000)
    est = tse.extract_file(str(mix_path), str(enroll_path), output_dir=str(tmp_path / "out"))
    assert est.shape == (1, sources.shape[1])
    assert torch.equal(est[0], sources[1, :, 0])   # B is source 0 of mixture 1
    y, sr = sf.read(tmp_path / "out" / "mix_target.wav")
    assert sr == SR and len(y) == sources.shape[1]
    # written at the mixture's level, not at the separator's
    assert abs(np.std(y) / (0.05 * float(sources[1, :, 0].std())) - 1) < 0.2


def test_wraps_a_real_separator_folder(tmp_path):
    """An ordinary Conv-TasNet folder (no trusted-code flag) runs end to end."""
    torch.manual_seed(0)
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(ConvTasNet(N=16, L=16, B=16, H=32, Sc=16, X=2, R=1).state_dict(), folder / "model.ckpt")
    (folder / "hyperparams.yaml").write_text(inference_yaml())
    tse = SeparateThenSelect.from_separator(str(folder), savedir=str(tmp_path / "saved"))
    est, scores, choice = tse.select_batch(torch.randn(1, 6000) * 0.1, torch.randn(1, 8000) * 0.1)
    assert est.shape == (1, 6000) and scores.shape == (1, 2)
    with pytest.raises(ValueError, match="enrolment"):
        tse.extract_batch(torch.randn(2, 6000), torch.randn(1, 8000))


def test_extraction_recipe_tests_separate_then_select(tmp_path):
    """`separate_then_select.yaml`: the extraction recipe tests a separator folder + GE2E on its
    test set (nothing trained); each row's SI-SDR is that of the source the selector returns."""
    import csv
    import json

    from conftest import ROOT, write_tone_corpus
    from modules.models.losses import si_snr

    torch.manual_seed(0)
    folder = tmp_path / "sep"
    folder.mkdir()
    torch.save(ConvTasNet(N=16, L=16, B=16, H=32, Sc=16, X=2, R=1).state_dict(), folder / "model.ckpt")
    (folder / "hyperparams.yaml").write_text(inference_yaml())
    corpus = write_tone_corpus(str(tmp_path / "corpus"), n_speakers=6, utts=2, sr=SR)
    recipe = load_recipe("target_speaker")
    out = tmp_path / "out"
    summary = recipe.run([os.path.join(ROOT, "recipes", "target_speaker", "hparams", "separate_then_select.yaml"),
                          f"--separator={folder}", f"--data_folder={corpus}", f"--output_folder={out}",
                          f"--cache_folder={tmp_path / 'cache'}", "--n_test=3", "--n_valid=2",
                          "--eval_max_seconds=1", "--n_audio_examples=3", "--noprogressbar"])
    assert summary["n_mixtures"] == 3 and summary["trained_params_M"] >= 0
    assert json.loads((out / "test_summary.json").read_text())["n_mixtures"] == 3
    with open(out / "test_results.csv") as f:
        rows = list(csv.DictReader(f))
    selector = SeparateThenSelect.from_separator(str(folder), savedir=str(tmp_path / "loaded"))
    for row in rows:
        ex = out / "examples" / row["snt_id"]
        mix, enroll, target = (torch.from_numpy(sf.read(ex / f"{n}.wav", dtype="float32")[0])
                               for n in ("mixture", "enrollment", "target"))
        est = selector.extract_batch(mix[None], enroll[None])[0]
        assert abs(float(si_snr(est, target)) - float(row["si-sdr"])) < 0.2
