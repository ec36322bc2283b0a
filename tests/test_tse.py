"""Target-speaker extraction models (modules/models/tse.py, and the STFT-mask extractor of
modules/models/stft_mask.py): speaker side, frame bookkeeping, and one test
per fix of the reference's weak points (fp16-safe bias, all-masked fallback, soft QKb, position
bias after the sequence switch, batches of different enrolment/mixture lengths)."""

import math

import pytest
import torch

from modules.models.base import GlobalLayerNorm
from modules.models.tse import (MHFA, LayerWeights, LearnedUpsampling, MaskedGlobalLayerNorm, SpeakerFusion,
                                SpeakerTransform, WavLMDynamicTasNet, WavLMTasNet, align_frames, mean_pooling,
                                qkb_key_bias, qkb_scores, sequence_layout, valid_frames)
from modules.models.wavlm import WavLM, mask_value, segment_attention_bias, tiny_wavlm_config

SR = 8000
# tiny WavLM with 20 ms frames at 8 kHz (stride 160), as the tiny recipe yamls
GEOMETRY = dict(conv_kernel=(10, 8, 8), conv_stride=(5, 4, 8))
SMALL = dict(encoder_dim=16, kernel_size=160, stride=80, bottleneck=16, hidden=16, skip=16)
TOL = 2e-5


FRONT_ENDS = ("layer", "group")  # feature-encoder norm: per-frame LayerNorm, or GroupNorm over time (base)


def make_wavlm(freeze=True, front="layer", **overrides):
    torch.manual_seed(0)
    config = tiny_wavlm_config(**{**GEOMETRY, "feat_extract_norm": front, **overrides})
    return WavLM(config=config, freeze=freeze)


def make_dynamic(**kw):
    args = dict(num_hybrid_layers=1, silence_seconds=0.25, sample_rate=SR, **SMALL)
    args.update(kw)
    wavlm = make_wavlm(freeze=args.pop("freeze", True), front=args.pop("front", "layer"))
    torch.manual_seed(1)
    return WavLMDynamicTasNet(wavlm, **args).eval()


def make_static(**kw):
    wavlm = make_wavlm(freeze=kw.pop("freeze", True), front=kw.pop("front", "layer"))
    torch.manual_seed(1)
    return WavLMTasNet(wavlm, mhfa_compression=8, mhfa_heads=2, speaker_dim=12, **SMALL, **kw).eval()


def ragged_batch():
    """Two items whose enrolments and mixtures differ in length (right-padded, relative lengths)."""
    torch.manual_seed(5)
    mix_n, enroll_n = (4000, 2731), (1500, 2400)
    mix, enroll = torch.zeros(2, max(mix_n)), torch.zeros(2, max(enroll_n))
    for b in range(2):
        mix[b, : mix_n[b]] = torch.randn(mix_n[b])
        enroll[b, : enroll_n[b]] = torch.randn(enroll_n[b])
    mix_lens = torch.tensor(mix_n) / max(mix_n)
    enroll_lens = torch.tensor(enroll_n) / max(enroll_n)
    return mix, enroll, mix_lens, enroll_lens, mix_n, enroll_n


# ----------------------------------------------------------------------------- speaker side


def test_mhfa_matches_a_slow_loop_and_ignores_padding():
    torch.manual_seed(0)
    mhfa = MHFA(num_layers=4, input_dim=10, compression_dim=6, num_heads=3, embed_dim=5)
    with torch.no_grad():
        for p in mhfa.parameters():
            p.copy_(torch.randn_like(p))
    hidden = torch.randn(4, 2, 9, 10)
    mask = torch.arange(9)[None, :] < torch.tensor([[9], [6]])
    out = mhfa(hidden, mask)
    assert out.shape == (2, 5)
    for b, n in enumerate((9, 6)):
        wk = torch.softmax(mhfa.key_weights.logits, 0)
        wv = torch.softmax(mhfa.value_weights.logits, 0)
        keys = mhfa.key_proj(sum(wk[i] * hidden[i, b, :n] for i in range(4)))
        values = mhfa.value_proj(sum(wv[i] * hidden[i, b, :n] for i in range(4)))
        heads = []
        for h in range(3):
            a = torch.softmax(keys @ mhfa.head_logits.weight[h] + mhfa.head_logits.bias[h], 0)
            heads.append((a[:, None] * values).sum(0))
        slow = mhfa.output(torch.cat(heads))
        assert torch.allclose(out[b], slow, atol=1e-5)
    # what lies in the padding does not matter
    noisy = hidden.clone()
    noisy[:, 1, 6:] = 100.0
    assert torch.allclose(mhfa(noisy, mask), out, atol=1e-5)


def test_mean_pooling_and_layer_weights():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.allclose(mean_pooling(x, mask)[1], x[1, :2].mean(0))
    layers = LayerWeights(3)
    stack = torch.randn(3, 2, 5, 4)
    assert torch.allclose(layers(stack), stack.mean(0), atol=1e-6)  # equal weights at the start
    assert torch.allclose(layers(list(stack)), layers(stack))


@pytest.mark.parametrize("mode", ["multiply", "add", "concat", "film"])
def test_fusion_modes(mode):
    torch.manual_seed(0)
    fusion = SpeakerFusion(6, 4, mode)
    x, e = torch.randn(2, 6, 7), torch.randn(2, 4)
    out = fusion(x, e)
    assert out.shape == x.shape
    t = fusion.transform(e)[..., None]
    if mode == "multiply":
        assert torch.allclose(out, x * t)
    elif mode == "add":
        assert torch.allclose(out, x + t)
    elif mode == "film":
        assert torch.allclose(out, x)  # identity at the start
    # the speaker changes the output
    assert not torch.allclose(fusion(x, e + 1) if mode != "film" else x, out) or mode == "film"
    with pytest.raises(ValueError, match="fusion mode"):
        SpeakerFusion(6, 4, "gate")


# ----------------------------------------------------------------------------- bookkeeping


def test_align_frames_against_slow_interpolation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11)
    lengths = torch.tensor([11, 7])
    # WavLM base geometry: 320-sample stride, 400-sample receptive field; encoder 160 / 320
    out = align_frames(x, 25, 160, 160, 320, 200, lengths)
    for b in range(2):
        for j in range(25):
            p = min(max((160 + 160 * j - 200) / 320, 0.0), lengths[b].item() - 1)
            i0 = math.floor(p)
            i1 = min(i0 + 1, lengths[b].item() - 1)
            slow = x[b, :, i0] * (1 - (p - i0)) + x[b, :, i1] * (p - i0)
            assert torch.allclose(out[b, :, j], slow, atol=1e-6)


@pytest.mark.parametrize("enroll_n,mix_n", [(1500, 4000), (1601, 2731), (999, 999), (3333, 1000)])
def test_mixture_frames_of_the_concatenation_are_those_of_the_mixture_alone(enroll_n, mix_n):
    """The mixture starts on a frame boundary: its conv frames inside [enroll | silence | mix] are
    exactly the conv frames of the mixture alone, for any enrolment / mixture length."""
    model = make_dynamic()
    torch.manual_seed(0)
    mix, enroll = torch.randn(1, mix_n), torch.randn(1, enroll_n)
    wav, real, layout = model.assemble(mix, enroll)
    conv = model.wavlm.model.feature_extractor
    with torch.no_grad():
        joint, alone = conv(wav), conv(mix)
    start, n = int(layout.mix_start_frame), int(layout.mix_frames)
    assert alone.shape[-1] == n and int(layout.total_frames) == joint.shape[-1]
    assert torch.allclose(joint[..., start:start + n], alone, atol=1e-6)
    # enrolment frames see enrolment samples only
    stride, receptive = 160, 10 + 7 * 5 + 7 * 20
    assert (int(layout.enroll_frames) - 1) * stride + receptive <= enroll_n
    ids = layout.segment_ids(joint.shape[-1])[0]
    n_enroll = int(layout.enroll_frames)
    assert ids.tolist() == [0] * n_enroll + [1] * (start - n_enroll) + [2] * n


def test_too_short_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="enrolment of 100 samples"):
        sequence_layout(torch.tensor([100]), torch.tensor([4000]), 800, (10, 8, 8), (5, 4, 8))


# ----------------------------------------------------------------------------- fix 1: fp16 / bf16


def test_hard_bias_is_finite_in_low_precision_where_minus_1e9_is_not():
    scores = torch.tensor([[0.2, 0.7, 0.3, 0.6]])
    for dtype in (torch.float16, torch.bfloat16):
        bias, _ = qkb_key_bias(scores, "hard", 0.5, dtype=dtype)
        assert bias.dtype == dtype and torch.isfinite(bias).all()
        # with the padding mask and the position bias added, still finite; masked keys get 0 weight
        total = bias + torch.tensor(mask_value(dtype), dtype=dtype) + torch.tensor(-30.0, dtype=dtype)
        assert torch.isfinite(total).all()
        weights = torch.softmax(torch.zeros(1, 1, 1, 4, dtype=dtype) + bias, -1)[0, 0, 0]
        assert weights[0] == 0 and weights[2] == 0 and torch.isfinite(weights).all()
    # the reference's -1e9 is -inf in float16: a fully masked row becomes NaN
    reference = torch.full((4,), -1e9).to(torch.float16)
    assert torch.isinf(reference).all() and torch.isnan(torch.softmax(reference, 0)).all()


def test_no_query_row_is_ever_fully_masked():
    """Hybrid mask + padding mask of a ragged batch: every query (padded ones included) keeps a
    key, so no row can turn into NaN even where a float16 cast makes the masks -inf."""
    model = make_dynamic()
    mix, enroll, mix_lens, enroll_lens, *_ = ragged_batch()
    _, _, layout = model.assemble(mix, enroll, mix_lens, enroll_lens)
    frames = int(layout.total_frames.max())
    assert (layout.total_frames < frames).any()  # one sample is padded
    segments = segment_attention_bias(layout.segment_ids(frames), torch.float16)
    real = torch.arange(frames)[None, :] < layout.total_frames[:, None]
    allowed = (segments == 0) & real[:, None, None, :]
    assert allowed.any(-1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dynamic_model_runs_in_low_precision(dtype):
    model = make_dynamic(num_hybrid_layers=1, qkb="hard", tau=0.9).to(dtype)
    mix, enroll, mix_lens, enroll_lens, *_ = ragged_batch()
    with torch.no_grad():
        out = model(mix.to(dtype), enroll.to(dtype), mix_lens, enroll_lens)
    assert out.dtype == dtype and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- fix 2: fallback


def slow_fallback(scores, tau, real, fraction):
    allowed = (scores >= tau) & real
    for b in range(scores.shape[0]):
        if not allowed[b].any():
            n = int(real[b].sum())
            k = max(1, math.ceil(fraction * n))
            order = sorted(range(n), key=lambda i: -float(scores[b, i]))  # real frames come first
            allowed[b, order[:k]] = True
    return allowed


def test_all_masked_sample_keeps_its_most_target_like_keys():
    torch.manual_seed(0)
    scores = torch.rand(3, 20) * 0.4 + 0.3
    scores[0, 3] = 0.6  # sample 0 has one target-like key: no fallback
    scores[1:] = scores[1:] * 0.4 + 0.2  # samples 1 and 2: every key below tau (distinct values)
    real = torch.arange(20)[None, :] < torch.tensor([[20], [20], [12]])  # sample 2: 12 real frames
    bias, fallback = qkb_key_bias(scores, "hard", 0.5, real, fallback_fraction=0.2)
    assert fallback.tolist() == [False, True, True]
    expected = slow_fallback(scores, 0.5, real, 0.2)
    assert torch.equal(bias[:, 0, 0] == 0, expected)
    assert (bias[2, 0, 0] == 0).sum() == 3  # ceil(0.2 * 12), never a padded key
    # attention over the kept keys instead of a uniform average over every (masked) key
    weights = torch.softmax(torch.zeros(3, 20) + bias[:, 0, 0], -1)
    assert torch.allclose(weights[1][expected[1]], torch.full((4,), 0.25))
    disabled, _ = qkb_key_bias(scores, "hard", 0.5, real, fallback_fraction=0.0)
    assert torch.allclose(torch.softmax(disabled[1, 0, 0], -1), torch.full((20,), 0.05))  # the old way


def test_model_reports_and_uses_the_fallback():
    mix, enroll, mix_lens, enroll_lens, *_ = ragged_batch()
    model = make_dynamic(num_hybrid_layers=1, qkb="hard", tau=1.0)  # s_t < 1 always: all suppressed
    with torch.no_grad():
        kept = model(mix, enroll, mix_lens, enroll_lens)
        assert model.last_fallbacks == 2 * (model.wavlm.num_layers - 1)
        model.qkb_fallback_fraction = 0.0
        uniform = model(mix, enroll, mix_lens, enroll_lens)
        assert model.last_fallbacks == 0
    assert torch.isfinite(kept).all() and (kept - uniform).abs().max() > 1e-4


# ----------------------------------------------------------------------------- fix 3: soft QKb


def test_soft_qkb_is_differentiable_and_hard_is_a_threshold():
    torch.manual_seed(0)
    h, e = torch.randn(2, 6, 8), torch.randn(2, 8)
    s = qkb_scores(h, e)
    cos = torch.nn.functional.cosine_similarity(h, e[:, None], dim=-1)
    assert torch.allclose(s, torch.sigmoid(cos))
    for mode, expected in (("soft", cos), ("soft_log", torch.log(s))):
        scale = torch.tensor(2.0, requires_grad=True)
        soft, _ = qkb_key_bias(s, mode, scale=scale)
        assert torch.allclose(soft[:, 0, 0], 2.0 * expected, atol=1e-5)
        soft.sum().backward()
        assert scale.grad is not None and scale.grad != 0
    hard, _ = qkb_key_bias(s, "hard", 0.5)
    assert torch.equal(hard[:, 0, 0] == 0, s >= 0.5)
    assert qkb_key_bias(s, "none") == (None, None)


def test_soft_scale_learns_through_a_frozen_wavlm():
    model = make_dynamic(qkb="soft", soft_scale=1.5)
    assert torch.isclose(model.soft_scale, torch.tensor(1.5))
    mix, enroll, mix_lens, enroll_lens, *_ = ragged_batch()
    model(mix, enroll, mix_lens, enroll_lens).pow(2).mean().backward()
    assert model.log_soft_scale.grad is not None and model.log_soft_scale.grad != 0
    assert all(p.grad is None for p in model.wavlm.parameters())
    assert make_dynamic(qkb="hard").log_soft_scale is None


# ------------------------------------------- fixes 4 and 5: position bias, ragged batches


@pytest.mark.parametrize("qkb", ["hard", "soft", "none"])
def test_ragged_batch_equals_each_item_alone(qkb):
    """Each item of a batch of different enrolment and mixture lengths gives the WavLM states,
    speaker and QKb scores it gives alone: per-sample segment boundaries, padding masks and a
    position bias recomputed for the mixture-only sequence."""
    model = make_dynamic(num_hybrid_layers=2, qkb=qkb, tau=0.5)
    mix, enroll, mix_lens, enroll_lens, mix_n, enroll_n = ragged_batch()
    with torch.no_grad():
        batch = model.mix_hidden_states(mix, enroll, mix_lens, enroll_lens)
        for b in range(2):
            alone = model.mix_hidden_states(mix[b:b + 1, : mix_n[b]], enroll[b:b + 1, : enroll_n[b]])
            n = alone["hidden"][0].shape[1]
            assert int(batch["padding_mask"][b].sum()) == n
            for together, single in zip(batch["hidden"], alone["hidden"]):
                assert (together[b, :n] - single[0]).abs().max() <= TOL
            assert (batch["speaker"][b] - alone["speaker"][0]).abs().max() <= TOL
            for together, single in zip(batch["scores"], alone["scores"]):
                assert (together[b, :n] - single[0]).abs().max() <= TOL
    # the bias after the switch is the one of positions 0 .. mixture frames - 1
    frames = batch["hidden"][-1].shape[1]
    expected = model.wavlm.relative_position_bias(torch.arange(frames))[None]
    assert torch.equal(batch["position_bias"], expected)


def test_ragged_batch_shapes_for_both_models():
    mix, enroll, mix_lens, enroll_lens, *_ = ragged_batch()
    for model in (make_dynamic(), make_static()):
        with torch.no_grad():
            out = model(mix, enroll, mix_lens, enroll_lens)
        assert out.shape == mix.shape and torch.isfinite(out).all()
    # the static model's speaker embedding ignores the enrolment padding
    static = make_static()
    with torch.no_grad():
        e = static.speaker_embedding(enroll, enroll_lens)
        e1 = static.speaker_embedding(enroll[1:, :2400])
    assert (e[1] - e1[0]).abs().max() <= TOL


def test_concatenated_input_equals_two_waveforms():
    model = make_dynamic()
    torch.manual_seed(3)
    mix, enroll = torch.randn(1, 3000), torch.randn(1, 1600)
    silence = torch.zeros(1, model.silence_samples)
    with torch.no_grad():
        two = model(mix, enroll)
        one = model(torch.cat([enroll, silence, mix], 1), enroll_samples=1600)
    assert torch.equal(one, two)
    with pytest.raises(ValueError, match="enroll_samples"):
        model(torch.cat([enroll, silence, mix], 1))


# ------------------------------------------- fix 6: the enrolment does not leak before layer N


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_mixture_states_before_the_switch_do_not_depend_on_the_enrolment(front):
    """Scaling or replacing only the enrolment leaves the mixture's states at the input and after
    layers 1..N unchanged; they are those of the mixture alone. The silence (3 frames) is
    narrower than the positional convolution's reach (8 frames), as in the released base model
    (1 s = 50 frames, reach 64), and the GroupNorm front end's statistics are taken per segment."""
    model = make_dynamic(front=front, num_hybrid_layers=2, silence_seconds=0.05, qkb="soft")
    torch.manual_seed(5)
    mix, enroll, other = torch.randn(1, 4000), torch.randn(1, 2400), torch.randn(1, 2400)
    n = model.num_hybrid_layers
    with torch.no_grad():
        base = model.mix_hidden_states(mix, enroll)
        alone = model.wavlm.hidden_states(mix)
        enroll_alone = model.wavlm.hidden_states(enroll, segments=torch.zeros_like(enroll, dtype=torch.long))
        for changed in (3 * enroll, other):
            new = model.mix_hidden_states(mix, changed)["hidden"]
            for layer in range(n + 1):
                assert (new[layer] - base["hidden"][layer]).abs().max() <= 1e-5, layer
        # after the switch the enrolment does act (through the QKb key bias)
        assert (new[-1] - base["hidden"][-1]).abs().max() > 1e-4
    for layer in range(n + 1):
        assert (base["hidden"][layer] - alone[layer]).abs().max() <= TOL, layer
    # the internal speaker is the mean of the enrolment's own states after layer N
    assert (base["speaker"][0] - enroll_alone[n][0, : int(base["layout"].enroll_frames)].mean(0)).abs().max() <= TOL


@pytest.mark.parametrize("qkb", ["soft", "soft_log", "hard", "none"])
def test_gradient_reaches_the_enrolment_only_through_soft_qkb(qkb):
    """With the hybrid mask and the per-segment statistics, the enrolment reaches the estimate
    only through the speaker e of the QKb bias: a gradient for the soft biases (and their scale),
    exactly none for the hard threshold and without QKb. Fine-tuned WavLM, GroupNorm front end."""
    model = make_dynamic(front="group", freeze=False, num_hybrid_layers=2, silence_seconds=0.05,
                         qkb=qkb, tau=0.6)
    torch.manual_seed(5)
    mix, enroll = torch.randn(1, 4000), torch.randn(1, 2400).requires_grad_(True)
    model(mix, enroll).pow(2).mean().backward()
    reach = float(enroll.grad.abs().max())
    if qkb.startswith("soft"):
        assert reach > 0
        assert model.log_soft_scale.grad is not None and model.log_soft_scale.grad != 0
    else:
        assert reach == 0.0


def test_soft_qkb_defaults_to_scale_times_cosine_starting_at_5():
    model = make_dynamic(qkb="soft")
    assert torch.isclose(model.soft_scale, torch.tensor(5.0))
    mix, enroll, mix_lens, enroll_lens, *_ = ragged_batch()
    with torch.no_grad():
        soft = model(mix, enroll, mix_lens, enroll_lens)
        model.qkb = "soft_log"
        other = model(mix, enroll, mix_lens, enroll_lens)
    assert (soft - other).abs().max() > 1e-6


# ------------------------------------------- ragged batches: masked statistics in the TCN blocks


def test_masked_gln_is_gln_without_a_mask_and_of_the_valid_frames_with_one():
    torch.manual_seed(0)
    plain = GlobalLayerNorm(6, channels_last=True)
    masked = MaskedGlobalLayerNorm(6, channels_last=True)
    with torch.no_grad():
        for norm in (plain, masked):
            norm.gamma.copy_(torch.linspace(0.5, 2, 6).view(1, 6, 1))
            norm.beta.copy_(torch.linspace(-1, 1, 6).view(1, 6, 1))
    x = torch.randn(2, 9, 6)
    assert torch.equal(masked(x), plain(x))
    mask = torch.arange(9)[None, :] < torch.tensor([[9], [5]])
    with valid_frames(masked, mask):
        out = masked(x)
    assert masked.frame_mask is None
    assert torch.allclose(out[1, :5], plain(x[1:, :5])[0], atol=1e-6) and (out[1, 5:] == 0).all()
    assert torch.allclose(out[0], plain(x[:1])[0], atol=1e-6)


OPTIONS = {
    "design": {},
    "reference_later": dict(mix_blocks=4, upsample="learned", mask_act="relu"),
    "blocks_before_proj": dict(mix_blocks=2, mix_blocks_before_proj=True),
    "encoder_features": dict(encoder_features=True),
}


@pytest.mark.parametrize("front", FRONT_ENDS)
@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_ragged_batch_output_equals_each_item_alone(front, options):
    """Each item of a batch of different enrolment and mixture lengths gives the estimate it
    gives alone (both models, both front ends, with the reference's options too)."""
    mix, enroll, mix_lens, enroll_lens, mix_n, enroll_n = ragged_batch()
    static_options = dict(OPTIONS[options], **({"fusion": "film", "speaker_transform": True}
                                                if options == "reference_later" else {}))
    for model in (make_dynamic(front=front, num_hybrid_layers=2, qkb="soft", **OPTIONS[options]),
                  make_static(front=front, **static_options)):
        noisy = mix.clone()
        noisy[1, mix_n[1]:] = 10.0  # what lies in the padding does not matter
        with torch.no_grad():
            batch = model(noisy, enroll, mix_lens, enroll_lens)
            for b in range(2):
                alone = model(mix[b:b + 1, : mix_n[b]], enroll[b:b + 1, : enroll_n[b]])[0]
                assert (batch[b, : mix_n[b]] - alone).abs().max() <= 1e-5 * alone.abs().max(), (type(model), b)


# ------------------------------------------- options for the reference's details


def test_encoder_features_add_the_normalised_mixture_encoding_before_the_fusion():
    """With ``encoder_features`` the mask head's input is the design's plus the speaker-fused,
    gLN-normalised TasNet encoding of the mixture (over each sample's valid frames); without
    it the mask head sees the mixture only through WavLM."""
    mix, enroll, mix_lens, enroll_lens, mix_n, _ = ragged_batch()
    plain, with_enc = make_static(), make_static(encoder_features=True)
    assert plain.encoder_norm is None and with_enc.encoder_norm is not None
    missing, unexpected = with_enc.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("encoder_norm.") for k in missing) and missing
    inputs = {}
    for name, model in (("plain", plain), ("with_enc", with_enc)):
        model.masker.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        with torch.no_grad():
            model(mix, enroll, mix_lens, enroll_lens)
    with torch.no_grad():
        w = plain.encode(mix * (torch.arange(mix.shape[-1]) < torch.tensor(mix_n)[:, None]))
        scale = plain.fusion.transform(plain.speaker_embedding(enroll, enroll_lens))[..., None]
    added = (inputs["with_enc"] - inputs["plain"]) / scale  # multiply fusion: the encoding's share
    frames = plain.encoder_frames(torch.tensor(mix_n), mix.shape[-1])
    for b in range(2):
        valid, own = added[b, :, : frames[b]], w[b, :, : frames[b]]
        assert abs(float(valid.mean())) < 1e-4 and abs(float(valid.var(unbiased=False)) - 1) < 1e-3
        expected = (own - own.mean()) / own.std(unbiased=False)
        assert torch.allclose(valid, expected, atol=1e-3)
        assert (added[b, :, frames[b]:].abs() < 1e-6).all()  # nothing from past the sample's end


def test_speaker_transform_is_three_linear_layers_with_a_tanh():
    torch.manual_seed(0)
    transform = SpeakerTransform(12)
    linear = [m for m in transform.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(12, 128), (128, 128), (128, 12)]
    e = torch.randn(3, 12)
    expected = linear[2](torch.tanh(linear[1](linear[0](e))))
    assert torch.allclose(transform(e), expected)
    fused = SpeakerFusion(6, 12, "film", speaker_transform=True)
    assert fused.speaker_transform is not None and SpeakerFusion(6, 12).speaker_transform is None


def test_learned_upsampling_starts_as_linear_interpolation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7)
    up = LearnedUpsampling(3)
    with torch.no_grad():
        y = up(x, 16)
    padded = torch.nn.functional.pad(x, (1, 1))  # zeros beyond both ends
    for m in range(7):
        assert torch.allclose(y[..., 2 * m], 0.75 * x[..., m] + 0.25 * padded[..., m], atol=1e-6)
        assert torch.allclose(y[..., 2 * m + 1], 0.75 * x[..., m] + 0.25 * padded[..., m + 2], atol=1e-6)
    # the output 2 * frames (a quarter of the last frame) is kept, then zeros
    assert torch.allclose(y[..., 14], 0.25 * x[..., 6], atol=1e-6) and (y[..., 15:] == 0).all()
    assert up(x, 5).shape[-1] == 5
    with pytest.raises(ValueError, match="upsample='interpolate'"):
        WavLMTasNet(make_wavlm(), upsample="learned", **{**SMALL, "stride": 40, "kernel_size": 80})


def test_options_build_the_reference_s_layers():
    model = make_static(mix_blocks=4, mix_blocks_before_proj=True, mask_act="relu")
    widths = [block.conv_in.in_channels for block in model.mix_blocks]
    assert widths == [model.wavlm.hidden_size] * 4
    assert [block.dilation for block in model.mix_blocks] == [1, 2, 4, 8]
    assert model.masker.mask_act_name == "relu"
    mix, enroll, mix_lens, enroll_lens, *_ = ragged_batch()
    with torch.no_grad():
        out = model(mix, enroll, mix_lens, enroll_lens)
    assert torch.isfinite(out).all()
    assert len(make_dynamic().mix_blocks) == 0 and len(make_static().mix_blocks) == 1
    with pytest.raises(ValueError, match="mask_act"):
        make_static(mask_act="tanh")
    with pytest.raises(ValueError, match="upsample"):
        make_dynamic(upsample="nearest")


def test_checkpoint_with_the_single_mix_block_loads():
    model = make_static()
    state = {(k.replace("mix_blocks.0.", "mix_block.") if k.startswith("mix_blocks.0.") else k): v + 1.0
             for k, v in model.state_dict().items()}
    fresh = make_static()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mix_blocks[0].conv_in.weight, model.mix_blocks[0].conv_in.weight + 1.0)


# ----------------------------------------------------------------------------- switches


def test_every_switch_changes_the_model():
    mix, enroll, mix_lens, enroll_lens, *_ = ragged_batch()
    with torch.no_grad():
        # tau near the median score of this random tiny WavLM, so that hard QKb masks some keys
        base = make_dynamic(num_hybrid_layers=1, qkb="hard", tau=0.6)(mix, enroll, mix_lens, enroll_lens)
        for kw in ({"hybrid_mask": False}, {"qkb": "none"}, {"qkb": "soft"}, {"num_hybrid_layers": 2},
                   {"tau": 0.65}):
            other = make_dynamic(**{"num_hybrid_layers": 1, "qkb": "hard", "tau": 0.6, **kw})(
                mix, enroll, mix_lens, enroll_lens)
            assert (other - base).abs().max() > 1e-6, kw
        # the target estimate depends on the enrolment
        assert (make_dynamic()(mix, enroll.flip(0), mix_lens, enroll_lens.flip(0)) - base).abs().max() > 1e-6
    with pytest.raises(ValueError, match="num_hybrid_layers"):
        make_dynamic(num_hybrid_layers=4)
    with pytest.raises(ValueError, match="qkb"):
        make_dynamic(qkb="sometimes")


def test_frozen_or_fine_tuned_wavlm():
    torch.manual_seed(0)
    mix, enroll = torch.randn(1, 2000), torch.randn(1, 1200)
    for make in (make_dynamic, make_static):
        frozen = make().train()
        frozen(mix, enroll).pow(2).mean().backward()
        assert all(p.grad is None for p in frozen.wavlm.parameters())
        assert frozen.masker.mask_conv.weight.grad is not None
        tuned = make(freeze=False).train()
        tuned(mix, enroll).pow(2).mean().backward()
        assert tuned.wavlm.model.encoder.layers[-1].attention.q_proj.weight.grad is not None


def test_ge2e_speaker_encoder_is_the_pretrained_frozen_d_vector():
    from modules.models.speaker import GE2EEncoder
    model = make_static(speaker_encoder="ge2e", sample_rate=SR).train()
    assert model.mhfa is None and not model.ge2e.training
    torch.manual_seed(4)
    mix, enroll, other = torch.randn(2, 4000), torch.randn(2, 6000), torch.randn(2, 6000)
    ref = GE2EEncoder(sample_rate=SR).eval()
    with torch.no_grad():
        assert (model.speaker_embedding(enroll) - ref(enroll)).abs().max() <= 1e-6
    # the enrolment reaches the output, and a training step leaves the d-vector model as it was
    before = {k: v.clone() for k, v in model.ge2e.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out = model(mix, enroll)
    assert (out - model(mix, other)).abs().max() > 1e-4
    out.pow(2).mean().backward()
    assert all(p.grad is None for p in model.ge2e.parameters())
    assert model.fusion.transform.weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.ge2e.state_dict().items())
    with pytest.raises(ValueError, match="speaker_encoder"):
        make_static(speaker_encoder="xvector")


def test_stft_mask_extractor_is_conditioned_on_the_frozen_d_vector_and_ignores_padding():
    from modules.data.audio import AudioError
    from modules.models.speaker import GE2EEncoder
    from modules.models.stft_mask import STFTMaskExtractor
    torch.manual_seed(0)
    model = STFTMaskExtractor(hidden=16, sample_rate=SR).train()
    assert not model.ge2e.training
    mix, enroll, other = torch.randn(2, 4000), torch.randn(2, 6000), torch.randn(2, 6000)
    with torch.no_grad():
        ref = GE2EEncoder(sample_rate=SR).eval()
        assert (model.speaker_embedding(enroll) - ref(enroll)).abs().max() <= 1e-6
    out = model(mix, enroll)
    assert out.shape == mix.shape
    assert (out - model(mix, other)).abs().max() > 1e-4  # the enrolment changes the estimate
    before = {k: v.clone() for k, v in model.ge2e.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out.pow(2).mean().backward()
    assert all(p.grad is None for p in model.ge2e.parameters())
    assert model.masker.rnn.weight_ih_l0.grad[:, -256:].abs().sum() > 0  # the d-vector's input weights train
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.ge2e.state_dict().items())
    # a ragged batch: each item gives what it gives alone, whatever the padding holds
    model.eval()
    lens = torch.tensor([1.0, 0.6])
    noisy = mix.clone()
    noisy[1, 2400:] = 10 * torch.randn(1600)
    with torch.no_grad():
        batch = model(noisy, enroll, lens)
        for b, n in enumerate((4000, 2400)):
            alone = model(mix[b:b + 1, :n], enroll[b:b + 1])
            assert (batch[b, :n] - alone[0]).abs().max() <= 1e-5
            assert not batch[b, n:].any()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the recurrence stays float32 in a ragged batch too
            low = model(noisy, enroll, lens)
            assert (low[1, :2400] - model(mix[1:2, :2400], enroll[1:2])[0]).abs().max() <= 1e-5
    with pytest.raises(AudioError, match="at least"):
        model(torch.randn(1, 100), enroll[:1])
    with pytest.raises(AudioError, match="real samples"):
        model(mix, enroll, torch.tensor([1.0, 0.01]))
    with pytest.raises(AudioError, match="same batch"):
        model(mix, enroll[:1])
