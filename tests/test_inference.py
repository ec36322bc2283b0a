"""Separator interface: loading a folder, shapes, channels, rates, long-file chunks (bad input:
test_bad_input.py)."""

import numpy as np
import pytest
import soundfile as sf
import torch

from modules.data.audio import AudioError
from modules.serving.inference import Separator, chunked_separation
from modules.models.losses import si_snr
from modules.models.convtasnet import ConvTasNet
from conftest import inference_yaml

TINY = dict(N=16, L=16, B=16, H=32, Sc=16, P=3, X=3, R=1, norm="chLN")


@pytest.fixture
def hub(tmp_path):
    torch.manual_seed(0)
    model = ConvTasNet(**TINY).eval()
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model.ckpt")
    (folder / "hyperparams.yaml").write_text(
        inference_yaml(X=3, norm="chLN", extra="chunk_seconds: 1.0\noverlap_seconds: 0.25"))
    sep = Separator.from_hparams(source=str(folder), savedir=str(tmp_path / "saved"))
    return sep, model, folder


def test_loads_folder_and_matches_model(hub):
    sep, model, _ = hub
    x = torch.randn(2, 6000)
    est = sep.separate_batch(x)
    assert est.shape == (2, 6000, 2)
    with torch.no_grad():
        assert torch.allclose(est, model(x), atol=1e-6)


def test_separate_file_channels_rates_and_outputs(hub, tmp_path, caplog):
    sep, _, _ = hub
    rng = np.random.default_rng(0)
    stereo = 0.3 * rng.standard_normal((16000, 2)).astype(np.float32)
    path = tmp_path / "stereo16k.wav"
    sf.write(path, stereo, 16000, subtype="PCM_24")
    est = sep.separate_file(str(path), output_dir=str(tmp_path / "out"))
    assert est.shape == (1, 8000, 2)  # 1 s, resampled to the model's 8 kHz
    assert "channels" in caplog.text
    for k in (1, 2):
        y, sr = sf.read(tmp_path / "out" / f"stereo16k_source{k}.wav")
        assert sr == 8000 and len(y) == 8000 and np.abs(y).max() <= 0.99 + 1e-4
    back = sep.separate_file(str(path), channel=1, resample_output=True)
    assert back.shape == (1, 16000, 2)
    with pytest.raises(AudioError, match="channel 5"):
        sep.separate_file(str(path), channel=5)


class PermutingOracle(torch.nn.Module):
    """Returns the true sources of the chunk it is given, in a random order each call."""

    def __init__(self, sources):
        super().__init__()
        self.sources, self.calls = sources, 0
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, mix):
        start = self.locate(mix)
        seg = self.sources[:, start:start + mix.shape[1]]
        self.calls += 1
        return seg[:, :, torch.randperm(seg.shape[-1], generator=self.gen)]

    def locate(self, mix):
        full = self.sources.sum(-1)[0]
        for s in range(full.shape[0] - mix.shape[1] + 1):
            if torch.equal(full[s:s + mix.shape[1]], mix[0]):
                return s
        raise AssertionError("chunk not found")


def test_chunks_keep_each_speaker_on_one_channel():
    g = torch.Generator().manual_seed(1)
    sources = torch.randn(1, 3000, 3, generator=g)
    oracle = PermutingOracle(sources)
    out = chunked_separation(oracle, sources.sum(-1), chunk=500, overlap=100)
    assert oracle.calls == 8
    # one global permutation maps the outputs onto the sources everywhere
    perm = [int(torch.argmax(torch.stack([si_snr(out[0, :, j], sources[0, :, k])
                                           for k in range(3)]))) for j in range(3)]
    assert sorted(perm) == [0, 1, 2]
    assert torch.allclose(out[0], sources[0][:, perm], atol=1e-5)


def test_chunked_agrees_with_whole_file(hub):
    sep, model, _ = hub
    x = torch.randn(1, 8000 * 4)  # 4 s: the hub folder uses 1 s chunks with 0.25 s overlap
    chunked = sep.separate_batch(x)
    with torch.no_grad():
        whole = model(x)
    for j in range(2):
        assert si_snr(chunked[0, :, j], whole[0, :, j]) > 20


class MisleadingOracle(torch.nn.Module):
    """Returns the true sources of chunk k (chunks called in order, ``hop`` apart) in a random
    order, except on the first ``overlap`` samples of every chunk after the first, where the
    channels are exchanged: matching chunks on their overlap picks the wrong order each time."""

    def __init__(self, sources, hop, overlap):
        super().__init__()
        self.sources, self.hop, self.overlap, self.calls = sources, hop, overlap, 0
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, mix):
        start = self.calls * self.hop
        seg = self.sources[:, start:start + mix.shape[1]].clone()
        if self.calls:
            seg[:, :self.overlap] = seg[:, :self.overlap].flip(-1)
        self.calls += 1
        return seg[:, :, torch.randperm(seg.shape[-1], generator=self.gen)]


def test_global_speaker_tracking_keeps_real_speakers_where_the_overlap_misleads(hub):
    """Two speechocean762 speakers, 48 s, 8-s chunks: the overlap alignment swaps the channels
    chunk after chunk; the GE2E assignment over the whole file keeps every chunk's speaker."""
    import glob
    import importlib.util
    import os

    from conftest import SPEECHOCEAN
    from modules.data.audio import resample

    if not os.path.isdir(SPEECHOCEAN) or importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("needs speechocean762 beside the repository and resemblyzer's weights")
    sr, seconds, chunk, overlap = 8000, 48, 8 * 8000, 2 * 8000
    tracks = []
    for speaker in ("0024", "0001"):
        pieces = [resample(torch.from_numpy(sf.read(f, dtype="float32")[0]), 16000, sr)
                  for f in sorted(glob.glob(os.path.join(SPEECHOCEAN, speaker, "*.flac")))]
        x = torch.cat(pieces * 4)[: seconds * sr]
        tracks.append(x / x.std())
    sources = torch.stack(tracks, -1)[None]                                  # [1, time, 2]
    sep, _, _ = hub
    sep.chunk_seconds, sep.overlap_seconds = chunk / sr, overlap / sr
    hop = chunk - overlap

    def core_swaps(out):
        """Chunks whose part outside the overlaps is in the other order than the first's."""
        cores = [slice(s + overlap, s + hop) for s in range(0, seconds * sr - overlap, hop)]
        order = [bool(si_snr(out[0, c, 0], sources[0, c, 0]) < si_snr(out[0, c, 0], sources[0, c, 1]))
                 for c in cores if c.stop <= seconds * sr]
        return sum(o != order[0] for o in order), len(order)

    results = {}
    for tracking in ("overlap", "global"):
        sep.mods["model"] = MisleadingOracle(sources, hop, overlap)
        sep.speaker_tracking = tracking
        results[tracking] = core_swaps(sep.separate_batch(sources.sum(-1)))
    assert results["overlap"][0] >= 2            # the chain of overlap decisions goes wrong
    assert results["global"] == (0, results["overlap"][1])
    sep.speaker_tracking = "nearest"
    with pytest.raises(ValueError, match="speaker_tracking"):
        sep.separate_batch(sources.sum(-1))
