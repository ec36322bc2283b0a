"""WavLM lobe (modules/models/wavlm.py): layer-by-layer run vs transformers, extra attention biases,
relative position bias, freezing, loading from an HF folder and from a unilm checkpoint
(modules/convert/fairseq.py)."""

import argparse
import json
import math
import pickle

import pytest
import torch

from modules.convert.fairseq import convert_fairseq_wavlm, load_fairseq_wavlm, parse_conv_feature_layers, wavlm_lobe
from modules.models.wavlm import (
    WavLM,
    attention_bias_from_mask,
    conv_output_lengths,
    frame_segments,
    mask_value,
    segment_attention_bias,
    tiny_wavlm_config,
)

TOL = 1e-5
VARIANTS = {
    # post-LN layers, GroupNorm in the first conv layer: wavlm-base / wavlm-base-plus
    "base": dict(),
    # pre-LN layers, LayerNorm in every conv layer, conv bias: wavlm-large
    "large": dict(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True),
}


def make_lobe(variant="base", seed=0, **kwargs):
    torch.manual_seed(seed)
    return WavLM(config=tiny_wavlm_config(**VARIANTS[variant]), **kwargs)


def padded_batch(lengths=(8000, 6000, 3100), seed=1):
    """Waveforms [batch, max(lengths)] with zeros after each length, and the sample mask."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    wav = torch.randn(len(lengths), int(lengths.max()), generator=generator) * mask
    return wav, lengths, mask.long()


def max_diff(a, b):
    return float((a - b).abs().max())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def lobe(request):
    return make_lobe(request.param)


# ----------------------------------------------------------------------------- equivalence


def test_layers_one_by_one_equal_transformers(lobe):
    wav, lengths, mask = padded_batch()
    with torch.no_grad():
        reference = lobe.model(wav, attention_mask=mask, output_hidden_states=True).hidden_states
    ours = lobe(wav, lengths.float() / wav.shape[1])
    assert ours.shape == (lobe.num_layers + 1, 3, lobe.num_frames(wav.shape[1]), lobe.hidden_size)
    diffs = [max_diff(a, b) for a, b in zip(reference, ours)]
    assert len(diffs) == lobe.num_layers + 1 and max(diffs) <= TOL, diffs
    # the HF sample mask gives the same as relative lengths
    assert max_diff(lobe(wav, attention_mask=mask), ours) == 0.0
    # and without padding information
    with torch.no_grad():
        reference = lobe.model(wav, output_hidden_states=True).hidden_states
    assert max(max_diff(a, b) for a, b in zip(reference, lobe(wav))) <= TOL


def test_split_run_equals_full_run(lobe):
    wav, lengths, _ = padded_batch()
    with torch.no_grad():
        full = lobe(wav, lengths.float() / wav.shape[1])
        hidden, padding = lobe.embed(wav, lengths.float() / wav.shape[1])
        first, position_bias = lobe.run_layers(hidden, 0, 1, padding_mask=padding)
        reused, _ = lobe.run_layers(first[-1], 1, None, position_bias=position_bias, padding_mask=padding)
        recomputed, _ = lobe.run_layers(first[-1], 1, None, padding_mask=padding)
    assert len(first) == 1 and len(reused) == lobe.num_layers - 1
    assert max(max_diff(a, b) for a, b in zip(full[1:], first + reused)) <= TOL
    assert max(max_diff(a, b) for a, b in zip(reused, recomputed)) == 0.0


def test_relative_position_bias_matches_transformers_and_slices(lobe):
    frames = 150  # beyond max_bucket_distance=64: exercises the logarithmic and the clamped buckets
    full = lobe.relative_position_bias(torch.arange(frames))
    hf = lobe.model.encoder.layers[0].attention.compute_bias(frames, frames)
    assert full.shape == (lobe.num_heads, frames, frames) and max_diff(full, hf) == 0.0
    # only key - query matters: a slice re-indexed from 0 has the same bias as the block
    assert max_diff(lobe.relative_position_bias(torch.arange(40)), full[:, 100:140, 100:140]) == 0.0
    # arbitrary (batched, non-contiguous) query/key positions
    queries = torch.tensor([[3, 7, 90], [0, 1, 2]])
    keys = torch.tensor([[0, 50, 149, 10], [5, 6, 7, 8]])
    batched = lobe.relative_position_bias(queries, keys)
    assert batched.shape == (2, lobe.num_heads, 3, 4)
    for b in range(2):
        assert max_diff(batched[b], full[:, queries[b]][:, :, keys[b]]) == 0.0


# ----------------------------------------------------------------------------- segments


def test_frame_segments_against_a_slow_loop():
    kernels, strides = (10, 8, 4), (5, 4, 4)
    segments = torch.full((2, 700), -1)
    segments[0, :300], segments[0, 320:650] = 0, 1
    segments[1, 40:700] = 2
    labels = frame_segments(segments, kernels, strides)
    assert labels.shape == (2, int(conv_output_lengths(torch.tensor(700), kernels, strides)))
    receptive, stride = 10 + 9 * 5 + 3 * 20, 80
    for b in range(2):
        for t in range(labels.shape[1]):
            values = set(segments[b, t * stride:t * stride + receptive].tolist())
            assert labels[b, t] == (values.pop() if len(values) == 1 else -1)


@pytest.mark.parametrize("normalize", [False, True])
def test_padded_batch_with_segments_equals_each_item_alone(lobe, normalize):
    """With the real samples as one segment, each item of a padded batch gives the hidden states
    it gives alone, also with the GroupNorm front end (whose statistics otherwise include the
    padding) and with waveform normalisation."""
    lobe.normalize_wav = normalize
    try:
        wav, lengths, mask = padded_batch()
        segments = torch.where(mask.bool(), 0, -1)
        with torch.no_grad():
            together = lobe(wav, attention_mask=mask, segments=segments)
            plain = lobe(wav, attention_mask=mask)
            for b, n in enumerate(lengths.tolist()):
                alone = lobe(wav[b:b + 1, :n])
                frames = alone.shape[2]
                assert max_diff(together[:, b, :frames], alone[:, 0]) <= TOL
                if b == 2 and lobe.config.feat_extract_norm == "group":
                    # without segments the shortest item's GroupNorm statistics include padding
                    assert max_diff(plain[:, b, :frames], alone[:, 0]) > 1e-2
    finally:
        lobe.normalize_wav = False


@pytest.mark.parametrize("normalize", [False, True])
def test_segments_of_a_concatenation_equal_the_segments_alone(lobe, normalize):
    """[A | gap | B], B starting on a frame boundary: the frames wholly inside A (inside B) equal
    those of A (B) alone at the transformer input, whatever the gap (narrower than the
    positional convolution here) and whatever the other segment holds."""
    lobe.normalize_wav = normalize
    try:
        generator = torch.Generator().manual_seed(7)
        a, b = torch.randn(1, 1500, generator=generator), torch.randn(1, 2400, generator=generator) * 0.1
        start = 1600  # a multiple of the 80-sample frame stride; gap of one frame
        wav = torch.cat([a, torch.zeros(1, start - 1500), b], 1)
        segments = torch.full(wav.shape, -1)
        segments[:, :1500], segments[:, start:] = 0, 1
        with torch.no_grad():
            joint, _ = lobe.embed(wav, segments=segments)
            louder, _ = lobe.embed(torch.cat([3 * a, wav[:, 1500:]], 1), segments=segments)
            plain, _ = lobe.embed(wav)
            alone_a, _ = lobe.embed(a)
            alone_b, _ = lobe.embed(b)
        n_a, first_b = alone_a.shape[1], start // lobe.frame_stride
        assert max_diff(joint[:, :n_a], alone_a) <= TOL
        assert max_diff(joint[:, first_b:first_b + alone_b.shape[1]], alone_b) <= TOL
        assert max_diff(louder[:, first_b:], joint[:, first_b:]) <= TOL
        # WavLM's own computation mixes the segments (positional convolution, GroupNorm)
        assert max_diff(plain[:, first_b:first_b + alone_b.shape[1]], alone_b) > 1e-2
    finally:
        lobe.normalize_wav = False


def test_segment_group_norm_for_runs_and_for_any_labels():
    """Per-segment GroupNorm statistics: segments that are runs of frames (normalised run by run)
    and scattered labels (masked sums) both agree with a slow loop; unlabelled frames get the bias."""
    lobe = make_lobe("base")
    norm = lobe.model.feature_extractor.conv_layers[0].layer_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    torch.manual_seed(8)
    feats = torch.randn(2, norm.num_channels, 40)
    runs = torch.full((2, 40), -1)
    runs[0, :15], runs[0, 18:], runs[1, 3:33] = 0, 1, 0
    scattered = runs.clone()
    scattered[0, 5:8] = 1  # segment 1 in two pieces
    for labels in (runs, scattered):
        with torch.no_grad():
            out = lobe._segment_group_norm(feats, labels, norm)
        for b in range(2):
            for t in range(40):
                label = int(labels[b, t])
                if label < 0:
                    assert torch.allclose(out[b, :, t], norm.bias)
                    continue
                inside = feats[b][:, labels[b] == label]
                mean, var = inside.mean(1), inside.var(1, unbiased=False)
                expected = (feats[b, :, t] - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
                assert torch.allclose(out[b, :, t], expected, atol=1e-4)
    # one layout shared by two samples beside other layouts and a sample of no segment: the same
    # values and gradients (input, weight, bias) as the masked sums
    feats = torch.randn(4, norm.num_channels, 40, requires_grad=True)
    norm.requires_grad_(True)
    labels = torch.full((4, 40), -1)
    labels[:2, 5:30] = 0
    labels[2, :12], labels[2, 20:] = 0, 1
    grads = []
    for fn in (lobe._segment_group_norm, lobe._masked_group_norm):
        out = fn(feats, labels, norm)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        got = torch.autograd.grad((out * weights).sum(), (feats, norm.weight, norm.bias))
        grads.append((out.detach(), *got))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_segments_must_label_every_sample():
    lobe = make_lobe()
    with pytest.raises(ValueError, match="segments must label every sample"):
        lobe.embed(torch.randn(2, 4000), segments=torch.zeros(2, 3999, dtype=torch.long))


# ----------------------------------------------------------------------------- extra bias


def slow_layer(lobe, layer_index, x, position_bias, extra, padding):
    """One WavLM layer written out with an explicit softmax (padding masked with -inf)."""
    layer = lobe.model.encoder.layers[layer_index]
    att = layer.attention
    batch, frames, dim = x.shape
    heads, head_dim = att.num_heads, dim // att.num_heads
    inp = layer.layer_norm(x) if lobe.stable_layer_norm else x
    def heads_first(t):
        return t.view(batch, frames, heads, head_dim).permute(0, 2, 1, 3)

    q, k, v = (heads_first(p(inp)) for p in (att.q_proj, att.k_proj, att.v_proj))
    g = att.gru_rel_pos_linear(heads_first(inp))
    g = torch.sigmoid(g.view(batch, heads, frames, 2, 4).sum(-1))
    gate = g[..., :1] * (g[..., 1:] * att.gru_rel_pos_const - 1.0) + 2.0
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + gate * position_bias + extra
    logits = logits.masked_fill(~padding[:, None, None, :], float("-inf"))
    out = att.out_proj((logits.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(batch, frames, dim))
    if lobe.stable_layer_norm:
        x = x + out
        return x + layer.feed_forward(layer.final_layer_norm(x))
    x = layer.layer_norm(x + out)
    return layer.final_layer_norm(x + layer.feed_forward(x))


def test_extra_bias_matches_slow_reference_and_changes_output(lobe):
    torch.manual_seed(2)
    x = torch.randn(2, 30, lobe.hidden_size)
    padding = torch.arange(30)[None, :] < torch.tensor([[30], [22]])
    extra = torch.randn(2, lobe.num_heads, 30, 30)
    with torch.no_grad():
        (ours,), position_bias = lobe.run_layers(x, 1, 2, attn_bias=extra, padding_mask=padding)
        slow = slow_layer(lobe, 1, x, position_bias, extra, padding)
        (plain,), _ = lobe.run_layers(x, 1, 2, padding_mask=padding)
    assert max_diff(ours, slow) <= TOL
    assert max_diff(ours, plain) > 1e-2


def test_block_diagonal_mask_equals_separate_runs(lobe):
    """[A | B] with a block-diagonal bias == A and B run alone, in every layer (transformer only)."""
    torch.manual_seed(3)
    a, b = torch.randn(2, 30, lobe.hidden_size), torch.randn(2, 40, lobe.hidden_size)
    b_real = torch.arange(40)[None, :] < torch.tensor([[40], [25]])  # sample 2: B right-padded
    joint = torch.cat([a, b], dim=1)
    segments = torch.cat([torch.zeros(2, 30), torch.ones(2, 40)], dim=1)
    padding = torch.cat([torch.ones(2, 30, dtype=torch.bool), b_real], dim=1)
    with torch.no_grad():
        together, _ = lobe.run_layers(joint, attn_bias=segment_attention_bias(segments), padding_mask=padding)
        alone_a, _ = lobe.run_layers(a)
        alone_b, _ = lobe.run_layers(b, padding_mask=b_real)
    for out, out_a, out_b in zip(together, alone_a, alone_b):
        assert max_diff(out[:, :30], out_a) <= TOL
        assert max_diff(out[:, 30:][b_real], out_b[b_real]) <= TOL


def test_sequence_switch_continues_on_the_slice(lobe):
    """Layers 0..N on [A | B] (block-diagonal), then N..L on B alone with its own position bias,
    equals all layers on [A | B] with the block-diagonal bias, restricted to B."""
    torch.manual_seed(4)
    joint = torch.randn(2, 50, lobe.hidden_size)
    bias = segment_attention_bias((torch.arange(50) >= 20).long().expand(2, -1))
    with torch.no_grad():
        everything, _ = lobe.run_layers(joint, attn_bias=bias)
        first, _ = lobe.run_layers(joint, 0, 2, attn_bias=bias)
        rest, position_bias = lobe.run_layers(first[-1][:, 20:], 2, None)
    assert position_bias.shape == (1, lobe.num_heads, 30, 30)
    assert max_diff(everything[-1][:, 20:], rest[-1]) <= TOL


def test_masked_keys_equal_dropped_frames_with_original_positions(lobe):
    torch.manual_seed(5)
    x = torch.randn(2, 40, lobe.hidden_size)
    keep = torch.ones(40, dtype=torch.bool)
    keep[[0, 7, 8, 9, 25, 39]] = False
    with torch.no_grad():
        masked, _ = lobe.run_layers(x, attn_bias=attention_bias_from_mask(keep[None, None, None, :]))
        dropped, _ = lobe.run_layers(x[:, keep], positions=torch.arange(40)[keep])
    assert max(max_diff(m[:, keep], d) for m, d in zip(masked, dropped)) <= TOL


def test_masks_stay_finite_in_low_precision():
    for dtype in (torch.float16, torch.bfloat16):
        value = torch.tensor(mask_value(dtype), dtype=dtype)
        assert torch.isfinite(value + value + torch.tensor(-50.0, dtype=dtype))
        assert float(torch.softmax(torch.tensor([0.0, mask_value(dtype)], dtype=dtype), 0)[1]) == 0.0
    lobe = make_lobe().to(torch.bfloat16)
    x = torch.randn(2, 30, lobe.hidden_size, dtype=torch.bfloat16)
    segments = (torch.arange(30) >= 12).long().expand(2, -1)
    # every key masked: a uniform softmax, not NaN
    everything = torch.full((2, 1, 30, 30), mask_value(torch.bfloat16), dtype=torch.bfloat16)
    with torch.no_grad():
        out, _ = lobe.run_layers(x, attn_bias=segment_attention_bias(segments, torch.bfloat16),
                                 padding_mask=torch.arange(30)[None, :] < torch.tensor([[30], [20]]))
        uniform, _ = lobe.run_layers(x, attn_bias=everything)
    assert all(torch.isfinite(o).all() for o in out + uniform)


# ----------------------------------------------------------------------------- freezing


def test_frozen_lobe_has_no_gradients_but_an_extra_bias_can_learn():
    lobe = make_lobe(freeze=True)
    assert not any(p.requires_grad for p in lobe.parameters())
    lobe.train()
    assert not lobe.model.training  # dropout stays off
    wav, lengths, _ = padded_batch((4000, 3000))
    out = lobe(wav, lengths.float() / 4000)
    assert not out.requires_grad and max_diff(out, lobe(wav, lengths.float() / 4000)) == 0.0
    # a learnable bias (e.g. a soft key suppression scale) still gets a gradient
    scale = torch.nn.Parameter(torch.tensor(1.0))
    hidden, padding = lobe.embed(wav, lengths.float() / 4000)
    def soft_bias(layer_index, h):
        return scale * h.mean(-1)[:, None, None, :]

    outputs, _ = lobe.run_layers(hidden, attn_bias=soft_bias, padding_mask=padding)
    outputs[-1].pow(2).mean().backward()
    assert scale.grad is not None and scale.grad != 0
    assert all(p.grad is None for p in lobe.parameters())


def test_unfrozen_lobe_trains():
    lobe = make_lobe(freeze=False).train()
    wav, lengths, _ = padded_batch((4000, 3000))
    out = lobe(wav, lengths.float() / 4000)
    assert max_diff(out, lobe(wav, lengths.float() / 4000)) > 0  # dropout active
    out[-1].pow(2).mean().backward()
    assert lobe.model.encoder.layers[0].attention.q_proj.weight.grad is not None
    assert lobe.model.feature_extractor.conv_layers[0].conv.weight.grad is not None
    assert not lobe.model.masked_spec_embed.requires_grad  # SpecAugment vector is never used

    partly = make_lobe(freeze=False, freeze_feature_extractor=True).train()
    partly(wav)[-1].pow(2).mean().backward()
    assert partly.model.feature_extractor.conv_layers[0].conv.weight.grad is None
    assert partly.model.encoder.layers[-1].feed_forward.output_dense.weight.grad is not None


def test_short_input_is_a_clear_error():
    lobe = make_lobe()
    with pytest.raises(ValueError, match="receptive field"):
        lobe(torch.randn(2, 4000), torch.tensor([1.0, 0.01]))


# ----------------------------------------------------------------------------- loading


def test_from_pretrained_local_folder(tmp_path):
    original = make_lobe("base")
    original.model.save_pretrained(tmp_path)
    loaded = WavLM(source=str(tmp_path))
    wav, lengths, _ = padded_batch()
    rel = lengths.float() / wav.shape[1]
    assert max_diff(loaded(wav, rel), original(wav, rel)) == 0.0
    assert loaded.freeze and not loaded.normalize_wav
    # preprocessor_config.json decides waveform normalisation unless it is given explicitly
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    assert WavLM(source=str(tmp_path)).normalize_wav
    assert not WavLM(source=str(tmp_path), normalize_wav=False).normalize_wav
    overridden = WavLM(source=str(tmp_path), config_overrides={"hidden_dropout": 0.0})
    assert overridden.config.hidden_dropout == 0.0
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        WavLM(source=str(tmp_path / "missing"))


def to_fairseq(lobe):
    """Inverse of the conversion: a unilm-style (cfg, state_dict) from an HF WavLMModel."""
    config = lobe.config
    layer_norm_item = "2" if config.feat_extract_norm == "group" else "2.1"
    renames = [
        ("feature_projection.projection.", "post_extract_proj."),
        ("feature_projection.layer_norm.", "layer_norm."),
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
        ("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
        ("masked_spec_embed", "mask_emb"),
        (".conv.", ".0."),
        (".layer_norm.", f".{layer_norm_item}."),  # conv layers only (checked below)
        (".attention.gru_rel_pos_linear.", ".self_attn.grep_linear."),
        (".attention.gru_rel_pos_const", ".self_attn.grep_a"),
        (".attention.rel_attn_embed.", ".self_attn.relative_attention_bias."),
        (".attention.", ".self_attn."),
        (".feed_forward.intermediate_dense.", ".fc1."),
        (".feed_forward.output_dense.", ".fc2."),
    ]
    state = {}
    for key, value in lobe.model.state_dict().items():
        new = key
        for old, rep in renames:
            if old == ".layer_norm." and not key.startswith("feature_extractor."):
                continue
            if old == ".conv." and not key.startswith("feature_extractor."):
                continue
            new = new.replace(old, rep)
        if key.startswith("encoder.layers.") and key.split(".")[3] == "layer_norm":
            new = new.replace(".layer_norm.", ".self_attn_layer_norm.")
        state[new] = value.clone()
    layers = zip(config.conv_dim, config.conv_kernel, config.conv_stride)
    conv = " + ".join(f"[({d},{k},{s})]" for d, k, s in layers)
    cfg = dict(
        extractor_mode="default" if config.feat_extract_norm == "group" else "layer_norm",
        encoder_layers=config.num_hidden_layers,
        encoder_embed_dim=config.hidden_size,
        encoder_ffn_embed_dim=config.intermediate_size,
        encoder_attention_heads=config.num_attention_heads,
        activation_fn="gelu",
        layer_norm_first=config.do_stable_layer_norm,
        conv_feature_layers=conv,
        conv_bias=config.conv_bias,
        normalize=config.do_stable_layer_norm,
        conv_pos=config.num_conv_pos_embeddings,
        conv_pos_groups=config.num_conv_pos_embedding_groups,
        relative_position_embedding=True,
        num_buckets=config.num_buckets,
        max_distance=config.max_bucket_distance,
        gru_rel_pos=True,
    )
    return cfg, state


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fairseq_checkpoint_converts_to_identical_model(variant, tmp_path):
    original = make_lobe(variant)
    cfg, state = to_fairseq(original)
    assert {"encoder.layers.0.self_attn.grep_a", "feature_extractor.conv_layers.0.0.weight"} <= set(state)
    config, converted = convert_fairseq_wavlm(state, cfg)
    assert config.do_stable_layer_norm == (variant == "large")
    rebuilt = WavLM(config=config)
    rebuilt.model.load_state_dict(converted, strict=True)
    wav, lengths, _ = padded_batch()
    expected = original(wav, lengths.float() / wav.shape[1])
    assert max_diff(rebuilt(wav, lengths.float() / wav.shape[1]), expected) == 0.0
    # the same through a checkpoint file and wavlm_lobe(...)
    path = tmp_path / "WavLM-tiny.pt"
    torch.save({"cfg": cfg, "model": state}, path)
    from_file = wavlm_lobe(str(path))
    assert from_file.normalize_wav == cfg["normalize"]
    if not from_file.normalize_wav:
        assert max_diff(from_file(wav, lengths.float() / wav.shape[1]), expected) == 0.0
    with pytest.raises(ValueError, match="wavlm_lobe"):
        WavLM(source=str(path))


def test_fairseq_conversion_names_missing_and_unexpected_keys():
    cfg, state = to_fairseq(make_lobe())
    incomplete = {k: v for k, v in state.items() if k != "encoder.layers.1.fc2.weight"}
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.feed_forward\.output_dense\.weight"):
        convert_fairseq_wavlm(incomplete, cfg)
    extra = dict(state, **{"encoder.layers.0.self_attn.rotary.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn\.rotary\.weight"):
        convert_fairseq_wavlm(extra, cfg)
    with pytest.warns(UserWarning, match="rotary"):
        _, converted = convert_fairseq_wavlm(extra, cfg, strict=False)
    assert "encoder.layers.0.attention.q_proj.weight" in converted
    wrong = dict(state, **{"encoder.layers.0.fc1.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="shape"):
        convert_fairseq_wavlm(wrong, cfg)


def test_checkpoint_with_python_objects_is_refused_with_a_way_out(tmp_path):
    cfg, state = to_fairseq(make_lobe())
    path = tmp_path / "namespace_cfg.pt"
    torch.save({"cfg": argparse.Namespace(**cfg), "model": state}, path)
    with pytest.raises(pickle.UnpicklingError, match="safe_globals"):
        load_fairseq_wavlm(str(path))
    config, _ = load_fairseq_wavlm(str(path), safe_globals=[argparse.Namespace])
    assert config.num_hidden_layers == cfg["encoder_layers"]
    torch.save({"weights": state}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'cfg' and 'model'"):
        load_fairseq_wavlm(str(tmp_path / "other.pt"))


def test_conv_feature_layers_are_parsed_without_eval():
    base = parse_conv_feature_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")
    assert base == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert math.prod(s for _, _, s in base) == 320
    with pytest.raises(ValueError):
        parse_conv_feature_layers("__import__('os').getcwd()")
