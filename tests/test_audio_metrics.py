"""Audio writing never clips; level matching; metrics against mir_eval and definitions."""

import numpy as np
import pytest
import soundfile as sf
import torch

from modules.data.audio import AudioError, match_level, read_audio, write_audio
from modules.training.metrics import sdr, separation_metrics


def test_write_audio_never_clips(tmp_path):
    x = torch.sin(torch.linspace(0, 100, 8000)) * 3.0  # peak 3: would clip
    gain = write_audio(tmp_path / "a.wav", x, 8000)
    y, sr = sf.read(tmp_path / "a.wav")
    assert sr == 8000 and gain == pytest.approx(0.99 / 3.0, rel=1e-6)
    assert np.abs(y).max() <= 0.99 + 1e-4
    assert np.corrcoef(y, x.numpy())[0, 1] > 0.9999  # same waveform, only scaled
    quiet = torch.full((100,), 0.25)
    assert write_audio(tmp_path / "b.wav", quiet, 8000) == 1.0


def test_write_audio_rejects_nan(tmp_path):
    with pytest.raises(AudioError, match="NaN/Inf"):
        write_audio(tmp_path / "c.wav", torch.tensor([0.0, float("nan")]), 8000)


def test_match_level_restores_mixture_scale():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4000, 2, generator=g)
    mix = s.sum(1)
    est = s * torch.tensor([25.0, -0.01])  # arbitrary network scale, even a sign flip
    assert torch.allclose(match_level(est, mix), s, atol=0.05)


def test_read_audio_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00not audio")
    with pytest.raises(AudioError, match="broken.wav"):
        read_audio(bad)


def test_sdr_matches_mir_eval():
    mir_eval = pytest.importorskip("mir_eval")
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4000, 2))
    est = ref @ np.array([[1.0, 0.3], [0.2, 1.0]]) + 0.1 * rng.standard_normal((4000, 2))
    ours = sdr(torch.from_numpy(est), torch.from_numpy(ref))
    theirs, _, _, _ = mir_eval.separation.bss_eval_sources(ref.T, est.T, compute_permutation=False)
    assert np.allclose(ours, theirs, atol=1e-2)


def test_separation_metrics_baselines():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(8000, 2, generator=g)
    mix = ref.sum(1)
    m, _ = separation_metrics(mix, mix.unsqueeze(1).repeat(1, 2), ref)
    assert abs(m["si-snr_i"]) < 1e-4 and abs(m["sdr_i"]) < 1e-3
    noisy = ref[:, [1, 0]] + 0.01 * torch.randn(8000, 2, generator=g)  # swapped order
    m, est = separation_metrics(mix, noisy, ref)
    assert m["si-snr"] > 35 and m["si-snr_i"] > 35 and m["sdr"] > 35
    assert torch.allclose(est, ref, atol=0.1)  # reordered to the references
