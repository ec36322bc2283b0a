"""GE2E d-vector encoder: equal to resemblyzer's VoiceEncoder on real speech, speaker-
discriminative on speechocean762, batched/cached/resampled consistently; the verdict metric."""

import glob
import importlib.util
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import LIBRISPEECH, SPEECHOCEAN
from modules.data.audio import resample
from modules.models import speaker as speaker_mod
from modules.models.speaker import GE2EEncoder, partial_starts
from modules.training.metrics import speaker_verdict_shares, speaker_verdicts

HAVE_WEIGHTS = importlib.util.find_spec("resemblyzer") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS, reason=f"resemblyzer not installed (`{speaker_mod.INSTALL_HINT}`)")


@pytest.fixture(scope="module")
def encoder():
    if not HAVE_WEIGHTS:
        pytest.skip(f"resemblyzer not installed (`{speaker_mod.INSTALL_HINT}`)")
    return GE2EEncoder(cache_size=0)


@pytest.fixture(scope="module")
def package_encoder():
    """The encoder with resemblyzer's own level rule (scale up to -30 dBFS, never down)."""
    if not HAVE_WEIGHTS:
        pytest.skip(f"resemblyzer not installed (`{speaker_mod.INSTALL_HINT}`)")
    return GE2EEncoder(cache_size=0, volume="increase", target_dbfs=-30)


def speechocean(n_speakers, n_utts):
    """``{speaker: [signal [time] at 16 kHz, ...]}`` of the first utterances of every 8th
    speaker of speechocean762 (adults and children), or a skip."""
    if not os.path.isdir(SPEECHOCEAN):
        pytest.skip(f"speechocean762 not found at {SPEECHOCEAN} (set SHARED_DATA)")
    speakers = sorted(d for d in os.listdir(SPEECHOCEAN) if d.isdigit())[::8][:n_speakers]
    out = {}
    for s in speakers:
        files = sorted(glob.glob(os.path.join(SPEECHOCEAN, s, "*.flac")))[:n_utts]
        out[s] = [torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in files]
    return out


def librispeech_utterances(k):
    files = sorted(glob.glob(os.path.join(LIBRISPEECH, "train-clean-100", "*", "*", "*.flac")))[:k]
    if not files:
        pytest.skip(f"real speech not found at {LIBRISPEECH} (set SHARED_DATA)")
    return [torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in files]


def test_partial_starts_by_hand():
    # 3 s: 301 frames, a partial every round(16000 / 1.3 / 160) = 77 frames; the third partial
    # [154, 314) holds 0.91 of its 25600 samples, so it stays
    assert partial_starts(48000) == [0, 77, 154]
    # 2 s: 201 frames; the second partial [77, 237) holds (32000 - 12320) / 25600 = 0.77
    assert partial_starts(32000) == [0, 77]
    assert partial_starts(31000) == [0]   # 0.73 < 0.75: dropped
    assert partial_starts(100) == [0]     # shorter than one partial: one, zero-padded
    with pytest.raises(ValueError, match="rate"):
        partial_starts(48000, rate=0.1)


@needs_weights
def test_matches_resemblyzer_voice_encoder(package_encoder):
    """Our torch front end + network against the package's VoiceEncoder.embed_utterance on the
    package's volume normalisation (its webrtcvad silence trim is the one step not reproduced).
    Needs librosa and webrtcvad (the package's __init__ imports them)."""
    pytest.importorskip("librosa", reason="resemblyzer's own front end needs librosa")
    pytest.importorskip("webrtcvad", reason="resemblyzer's own front end needs webrtcvad")
    from resemblyzer import VoiceEncoder
    from resemblyzer.audio import normalize_volume

    utts = librispeech_utterances(3) + [u[0] for u in speechocean(3, 1).values()]
    ref_model = VoiceEncoder("cpu", verbose=False)
    worst = 0.0
    for x in utts:
        ref = ref_model.embed_utterance(normalize_volume(x.numpy(), -30, increase_only=True))
        ours = package_encoder(x)[0].numpy()
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst < 1e-5, worst


@needs_weights
def test_8khz_input_close_to_resemblyzer_at_16khz():
    """Input at 8 kHz is resampled inside; its embedding stays close to the package's of the
    same signal resampled as its preprocess_wav does (librosa/soxr; ours: torchaudio Kaiser)."""
    pytest.importorskip("librosa")
    pytest.importorskip("webrtcvad")
    from resemblyzer import VoiceEncoder
    from resemblyzer.audio import normalize_volume
    import librosa

    enc8 = GE2EEncoder(sample_rate=8000, cache_size=0, volume="increase", target_dbfs=-30)
    ref_model = VoiceEncoder("cpu", verbose=False)
    for x in [u[0] for u in speechocean(3, 1).values()]:
        x8 = resample(x, 16000, 8000)
        ref = ref_model.embed_utterance(normalize_volume(
            librosa.resample(x8.numpy(), orig_sr=8000, target_sr=16000), -30, increase_only=True))
        assert float(enc8(x8)[0] @ torch.from_numpy(ref)) > 0.999


def test_same_speaker_closer_than_different_on_speechocean(encoder):
    """Different utterances of one speaker are closer than utterances of different speakers,
    and the first utterance identifies the speaker of the others (closed set of 12)."""
    data = speechocean(12, 3)
    names = list(data)
    emb = {s: encoder(torch.nn.utils.rnn.pad_sequence(u, batch_first=True),
                      torch.tensor([len(x) for x in u]) / max(len(x) for x in u))
           for s, u in data.items()}
    same = [float(emb[s][i] @ emb[s][j]) for s in names for i in range(3) for j in range(i + 1, 3)]
    diff = [float(emb[s][i] @ emb[r][j]) for s in names for r in names if s < r
            for i in range(3) for j in range(3)]
    assert np.mean(same) > np.mean(diff) + 0.15, (np.mean(same), np.mean(diff))
    enrol = torch.stack([emb[s][0] for s in names])
    hits = [names[int((enrol @ emb[s][i]).argmax())] == s for s in names for i in (1, 2)]
    assert np.mean(hits) >= 0.8, np.mean(hits)


def test_ragged_batch_equals_each_alone(encoder):
    a, b = [u[0] for u in speechocean(2, 1).values()]
    batch = torch.nn.utils.rnn.pad_sequence([a, b], batch_first=True)
    lens = torch.tensor([len(a), len(b)]) / batch.shape[-1]
    together = encoder(batch, lens)
    alone = torch.cat([encoder(a), encoder(b)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the padding is not part of the embedding: a padded row without lengths differs
    short = 0 if len(a) < len(b) else 1
    assert not torch.allclose(encoder(batch)[short], alone[short], atol=1e-3)


def test_level_does_not_move_the_embedding(encoder, package_encoder):
    """By default every input is brought to the same RMS, so an estimate at another level than
    its enrolment keeps its embedding; the package's rule (louder input left as it is) does not."""
    x = next(iter(speechocean(1, 1).values()))[0]
    quiet, loud = torch.stack([x, 20 * x]).chunk(2)
    assert torch.allclose(encoder(quiet), encoder(loud), atol=1e-5)
    assert float(package_encoder(quiet)[0] @ package_encoder(loud)[0]) < 0.99
    assert float(package_encoder(0.01 * x)[0] @ package_encoder(0.001 * x)[0]) > 1 - 1e-5


def test_trim_long_silences_cuts_a_gap(encoder):
    """A 1-s digital silence inside an utterance is cut to at most 2 x 3 windows of 30 ms by
    the optional trim (as are the utterance's own long pauses); with it the embedding is close
    to that of the utterance without the gap."""
    x = next(iter(speechocean(1, 1).values()))[0][:-1000]   # not a multiple of 30 ms
    gap = torch.cat([x, torch.zeros(16000), x])
    joined = torch.cat([x, x])
    pair = torch.nn.utils.rnn.pad_sequence([gap, joined], batch_first=True)
    wav, n = speaker_mod.trim_long_silences(pair, torch.tensor([len(gap), len(joined)]), 40.0)
    assert int(n[1]) < len(joined) - 16000 // 4                # the recording's own silences
    assert abs(int(n[0] - n[1])) <= 6 * 480, n          # the gap is gone
    assert not wav[1, int(n[1]):].any()
    kept = speaker_mod.trim_long_silences(joined[None], torch.tensor([len(joined)]), 40.0)[0]
    assert torch.equal(wav[1, :int(n[1])], kept[0, :int(n[1])])  # a row alone: the same cut
    silent, m = speaker_mod.trim_long_silences(torch.zeros(1, 4000), torch.tensor([4000]), 40.0)
    assert int(m) == 4000                     # nothing voiced: kept whole
    trim = GE2EEncoder(cache_size=0, trim_silence_db=40.0)
    assert float(trim(gap)[0] @ trim(joined)[0]) > float(encoder(gap)[0] @ encoder(joined)[0])
    assert float(trim(gap)[0] @ trim(joined)[0]) > 0.98


def test_frozen_cache_and_gradient_to_input(monkeypatch):
    if not HAVE_WEIGHTS:
        pytest.skip(f"resemblyzer not installed (`{speaker_mod.INSTALL_HINT}`)")
    enc = GE2EEncoder(cache_size=2)
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 8000) * 0.1
    calls = []
    compute = enc.compute
    monkeypatch.setattr(enc, "compute", lambda w, n: calls.append(w.shape[0]) or compute(w, n))
    first = enc(x)
    assert torch.equal(enc(x.clone()), first) and calls == [2]     # same content: cached
    assert torch.allclose(enc(x[1:]), first[1:]) and calls == [2]
    enc(x, keys=["a", "b"])
    enc(torch.zeros(1, 8000), keys=["a"])                            # caller id wins over content
    assert calls == [2, 2] and torch.equal(enc(torch.zeros(1, 8000), keys=["a"]), first[:1])
    assert len(enc._cache) == 2                                     # least recently used dropped
    enc(x, cache=False)
    assert calls[-1] == 2
    # a gradient reaches the input (frozen weights, no cache on that path)
    y = x.clone().requires_grad_(True)
    enc(y)[:, 0].sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    trainable = GE2EEncoder(freeze=False, cache_size=8)
    trainable(x)
    assert len(trainable._cache) == 0


def test_a_bf16_autocast_leaves_the_d_vectors_and_their_cache_as_in_float32():
    """A model trained or run under ``torch.autocast(bfloat16)`` calls the frozen encoder inside
    it; the 8-kHz input's resampling would then run in bf16, and the cache key could not hash it."""
    if not HAVE_WEIGHTS:
        pytest.skip(f"resemblyzer not installed (`{speaker_mod.INSTALL_HINT}`)")
    enc = GE2EEncoder(sample_rate=8000, cache_size=4)
    x = torch.randn(2, 8000) * 0.1
    ref = GE2EEncoder(sample_rate=8000, cache_size=0)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)
        again = enc(x.clone())                                       # same samples: from the cache
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(again, out) and len(enc._cache) == 2


def test_missing_weights_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(speaker_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps resemblyzer==0.1.4"):
        GE2EEncoder()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps resemblyzer==0.1.4"):
        GE2EEncoder(weights=str(tmp_path / "nowhere.pt"))


def test_speaker_verdicts_by_hand():
    t, i = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    angle = torch.tensor([0.0, 0.7, 0.78, 0.86, 1.4])                 # radians from the target
    est = torch.stack([angle.cos(), angle.sin()], -1)
    # cos to target minus cos to interferer: 1, 0.12, 0.01, -0.11, -0.82
    verdicts = speaker_verdicts(est, t.expand(5, 2), i.expand(5, 2), margin=0.05)
    assert verdicts == ["correct", "correct", "ambiguous", "confused", "confused"]
    shares = speaker_verdict_shares(est, t.expand(5, 2), i.expand(5, 2), margin=0.05)
    assert shares == {"correct": 0.4, "ambiguous": 0.2, "confused": 0.4}
    # several interferers: the closest counts; scale does not matter
    two = torch.stack([i, -i], 1).expand(5, 2, 2)
    assert speaker_verdicts(3 * est, t.expand(5, 2), two) == verdicts
    assert speaker_verdicts(est, t.expand(5, 2), i.expand(5, 2), margin=2.0) == ["ambiguous"] * 5
    with pytest.raises(ValueError, match="margin"):
        speaker_verdicts(est, t.expand(5, 2), i.expand(5, 2), margin=-1)


def test_verdicts_on_real_speech(encoder):
    """Clean target: correct; clean interferer: confused; on d-vectors of speechocean762."""
    data = speechocean(2, 2)
    (a1, a2), (b1, b2) = data.values()
    n = min(len(a1), len(b1))
    emb = encoder(torch.stack([a1[:n], b1[:n]]))
    enrol = encoder(torch.nn.utils.rnn.pad_sequence([a2, b2], batch_first=True),
                    torch.tensor([len(a2), len(b2)]) / max(len(a2), len(b2)))
    verdicts = speaker_verdicts(emb, enrol[[0, 0]], enrol[[1, 1]])
    assert verdicts == ["correct", "confused"]
