"""WavLM lobe: Hugging Face ``transformers.WavLMModel`` weights, transformer layers run by us.

Reference: S. Chen et al., "WavLM: Large-Scale Self-Supervised Pre-Training for Full Stack Speech
Processing", IEEE JSTSP 16(6), 2022 (arXiv:2110.13900).

The weights live in a ``transformers.WavLMModel`` (so every HF-format folder such as a copy of
``microsoft/wavlm-base-plus`` loads as is), but :class:`WavLM` runs the transformer layers one by
one itself instead of calling ``WavLMModel.forward``. That is what target-speaker extraction needs:

* an extra additive attention bias per layer (block-diagonal segment masks, per-key suppression),
  added to the attention logits together with WavLM's gated relative position bias and the
  padding mask;
* control of the relative position bias: computed once for a sequence and reused by every layer
  (as WavLM does), or computed for arbitrary query/key frame positions;
* stopping after layer N and continuing from layer N on another (e.g. sliced) sequence;
* statistics per segment before the first layer (``segments`` of :meth:`WavLM.embed`), so that
  a segment of a concatenated waveform, or a sample of a padded batch, gives the frames it
  gives alone (transformers' GroupNorm front end takes them over the whole padded input).

With no extra bias the result equals ``WavLMModel(..., output_hidden_states=True).hidden_states``
(tested to 1e-5 for padded batches, for the post-LN base models and the pre-LN large models).

Shapes: waveforms ``[batch, samples]`` (16 kHz); hidden states ``[batch, frames, dim]`` (20 ms
frames for the released models); attention biases broadcastable to ``[batch, heads, frames,
frames]``; padding masks ``[batch, frames]`` with True on real frames.

Facts about the computation come from ``transformers/models/wavlm/modeling_wavlm.py``
(transformers 4.57.6: ``WavLMAttention``, ``WavLMEncoderLayer``, ``WavLMEncoderLayerStableLayerNorm``,
``WavLMEncoder``, ``WavLMEncoderStableLayerNorm``, ``WavLMModel``), which follows the original
``wavlm/WavLM.py`` and ``wavlm/modules.py`` of https://github.com/microsoft/unilm.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WavLMConfig, WavLMModel

__all__ = [
    "WavLM",
    "tiny_wavlm_config",
    "mask_value",
    "attention_bias_from_mask",
    "segment_attention_bias",
    "relative_position_bucket",
    "conv_output_lengths",
    "frame_segments",
]

AttnBias = torch.Tensor | Sequence[torch.Tensor | None] | Callable[[int, torch.Tensor], torch.Tensor | None]


# --------------------------------------------------------------------------------------------
# Small pure functions
# --------------------------------------------------------------------------------------------


def mask_value(dtype: torch.dtype) -> float:
    """The additive bias that removes a key from the softmax: ``finfo(dtype).min / 4``.

    Finite on purpose: a hard ``-inf`` (or ``-1e9``, which overflows float16) turns a row whose
    keys are all masked into NaN. A quarter of the most negative value leaves room to add the
    padding mask, an extra mask and the (small) position bias without overflowing to ``-inf``,
    and still gives ``exp(...) == 0`` exactly for masked keys in float32, float16 and bfloat16.
    If *every* key of a query is masked the softmax becomes uniform over them instead of NaN:
    callers that can produce such rows should keep at least one key (e.g. the query itself).
    """
    return torch.finfo(dtype).min / 4


def attention_bias_from_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention bias from a boolean mask: 0 where ``allowed`` is True, else
    :func:`mask_value`. ``allowed`` is broadcastable to ``[batch, heads, queries, keys]``."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.tensor(mask_value(dtype), dtype=dtype, device=allowed.device))


def segment_attention_bias(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-diagonal bias: frame t may attend to frame s only if both carry the same segment id.

    Arguments
    ---------
    segment_ids : torch.Tensor
        ``[batch, frames]`` integer segment label of every frame (e.g. 0 enrolment, 1 silence,
        2 mixture).

    Returns
    -------
    torch.Tensor
        ``[batch, 1, frames, frames]`` additive bias (0 inside a segment, :func:`mask_value`
        across segments). Every query keeps at least itself, so no row is fully masked.

    In :meth:`WavLM.run_layers` this makes each segment's transformer outputs exactly those of
    the segment run alone (the relative position bias depends only on offsets). It does not
    isolate what happens before the layers in :meth:`WavLM.embed` on a concatenated waveform
    (conv frames straddling a boundary, the GroupNorm of the base models' first conv layer and
    the positional convolution, 128 frames wide in the released models, all mix segments)
    unless :meth:`WavLM.embed` is given the segments of the waveform too.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return attention_bias_from_mask(same[:, None], dtype)


def relative_position_bucket(
    relative_positions: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket index of a relative position ``key - query`` (bidirectional T5-style buckets).

    Half of the buckets are for positive offsets, half for the others; within a half, offsets
    below ``num_buckets // 4`` get their own bucket and larger ones share logarithmically wider
    buckets up to ``max_distance``. The formula and its float32 evaluation order are those of
    ``WavLMAttention._relative_positions_bucket`` in transformers' ``modeling_wavlm.py`` (and of
    ``MultiheadAttention._relative_positions_bucket`` in unilm's ``wavlm/modules.py``), so the
    bucket boundaries agree exactly.
    """
    half = num_buckets // 2
    exact = half // 2
    bucket = (relative_positions > 0).long() * half
    distance = relative_positions.abs()
    # distances below `exact` are used as is; the clamp only keeps log() finite for them
    far = torch.log(distance.clamp(min=1).float() / exact)
    far = far / math.log(max_distance / exact)
    far = far * (half - exact)
    far = (exact + far).long().clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


def conv_output_lengths(
    lengths: torch.Tensor, kernels: Sequence[int], strides: Sequence[int]
) -> torch.Tensor:
    """Frames produced by a stack of unpadded 1-D convolutions from ``lengths`` samples:
    ``floor((n - kernel) / stride) + 1`` per layer (as ``_get_feat_extract_output_lengths`` of
    transformers). Lengths shorter than the receptive field give 0 (never negative)."""
    for kernel, stride in zip(kernels, strides):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def frame_segments(segments: torch.Tensor, kernels: Sequence[int], strides: Sequence[int]) -> torch.Tensor:
    """Segment label of every output frame of a stack of unpadded 1-D convolutions.

    ``segments [batch, samples]`` labels every sample (``>= 0``, or -1 for no segment). A frame
    takes the label of its samples when they all carry the same one, else -1 (it straddles a
    boundary or touches an unlabelled sample). ``[batch, frames]`` long, frames as
    :func:`conv_output_lengths`."""
    labels = segments.to(torch.float32)[:, None, :]
    for kernel, stride in zip(kernels, strides):
        high = F.max_pool1d(labels, kernel, stride)
        low = -F.max_pool1d(-labels, kernel, stride)
        labels = torch.where(low == high, low, torch.full_like(low, -1.0))
    return labels[:, 0].long()


def tiny_wavlm_config(**overrides) -> WavLMConfig:
    """A small random-init WavLM for tests and ``--debug`` runs (about 0.2 M parameters).

    hidden 64, 3 layers, 4 heads, FFN 128, three conv layers of 32 channels (kernels 10/8/4,
    strides 5/4/4: one frame every 80 samples, receptive field 105 samples), positional conv of 16
    taps in 4 groups, 32 relative-position buckets up to distance 64. Keyword arguments override
    any ``WavLMConfig`` field (e.g. ``do_stable_layer_norm=True`` for the pre-LN variant).
    """
    fields = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 8, 4),
        conv_stride=(5, 4, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_buckets=32,
        max_bucket_distance=64,
    )
    fields.update(overrides)
    return WavLMConfig(**fields)


# --------------------------------------------------------------------------------------------
# The lobe
# --------------------------------------------------------------------------------------------


class WavLM(nn.Module):
    """WavLM feature extractor whose transformer layers can be run one by one with extra biases.

    Arguments
    ---------
    source : str, optional
        A local HF-format folder (``config.json`` + weights, e.g. a copy of
        ``microsoft/wavlm-base-plus``; loaded with ``local_files_only=True``). An original
        unilm/fairseq checkpoint file ``*.pt`` loads with
        :func:`modules.convert.fairseq.wavlm_lobe`. Exactly one of ``source`` and ``config``.
    config : transformers.WavLMConfig or dict, optional
        Build a randomly initialised model from this config (see :func:`tiny_wavlm_config`).
    freeze : bool
        True (default): no parameter gets a gradient, the model stays in eval mode (no dropout,
        no LayerDrop) even under ``.train()``, and :meth:`forward` runs under ``torch.no_grad``.
        :meth:`run_layers` still lets gradients reach an extra attention bias or a hidden-state
        input that requires them (the frozen weights themselves get none).
    freeze_feature_extractor : bool
        Fine-tune the transformer but keep the convolutional feature encoder fixed (no gradient).
    normalize_wav : bool, optional
        Normalise each waveform to zero mean, unit variance over its real samples first. None
        (default): as the checkpoint says (``do_normalize`` of ``preprocessor_config.json`` in an
        HF folder), False for a bare config. The released base / base+ models use False, WavLM
        Large uses True.
    layerdrop : float
        Probability of skipping a transformer layer (never the first) while fine-tuning in train
        mode. The checkpoint's own ``layerdrop`` is ignored: 0.0 unless you set it here.
    config_overrides : dict, optional
        ``WavLMConfig`` fields to change (e.g. dropout rates), for ``source`` and ``config``.

    Example
    -------
    >>> lobe = WavLM(config=tiny_wavlm_config())
    >>> wav = torch.randn(2, 8000)
    >>> lobe(wav, torch.tensor([1.0, 0.6])).shape  # [layers + 1, batch, frames, dim]
    torch.Size([4, 2, 99, 64])
    """

    def __init__(
        self,
        source: str | None = None,
        config: WavLMConfig | dict | None = None,
        freeze: bool = True,
        freeze_feature_extractor: bool = False,
        normalize_wav: bool | None = None,
        layerdrop: float = 0.0,
        config_overrides: dict | None = None,
    ):
        super().__init__()
        if (source is None) == (config is None):
            raise ValueError("give exactly one of `source` (HF folder) and `config`")
        overrides = dict(config_overrides or {})
        detected_normalize = False
        if config is not None:
            # a copy: the caller's config object is left as it was
            config = WavLMConfig(**(dict(config) if isinstance(config, Mapping) else config.to_dict()))
            for key, value in overrides.items():
                setattr(config, key, value)
            self.model = WavLMModel(config)
        elif os.path.isdir(source):
            self.model = WavLMModel.from_pretrained(source, local_files_only=True, **overrides)
            detected_normalize = _folder_do_normalize(source)
        elif os.path.isfile(source):
            raise ValueError(
                f"WavLM source {source!r} is a file; WavLM(source=...) reads HF folders (config.json + "
                "weights). For a unilm checkpoint file (WavLM-Base+.pt) use "
                "modules.convert.fairseq.wavlm_lobe(source, ...), which converts it"
            )
        else:
            raise FileNotFoundError(
                f"WavLM source {source!r} is neither a folder (HF format: config.json + weights, e.g. "
                "a copy of microsoft/wavlm-base-plus) nor a unilm checkpoint file (WavLM-Base+.pt, "
                "loaded with modules.convert.fairseq.wavlm_lobe)"
            )
        self.config = self.model.config
        self.normalize_wav = detected_normalize if normalize_wav is None else bool(normalize_wav)
        self.layerdrop = float(layerdrop)
        self.freeze = bool(freeze)
        self.freeze_feature_extractor = bool(freeze_feature_extractor)
        # SpecAugment is never applied here: keep its vector out of the optimiser (and out of
        # DDP's unused-parameter check)
        if hasattr(self.model, "masked_spec_embed"):
            self.model.masked_spec_embed.requires_grad_(False)
        if self.freeze:
            self.model.requires_grad_(False)
            self.model.eval()
        elif self.freeze_feature_extractor:
            self.model.feature_extractor.requires_grad_(False)

    # ---------------------------------------------------------------- bookkeeping

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def stable_layer_norm(self) -> bool:
        """True for the pre-LN layers of WavLM Large, False for the post-LN base models."""
        return bool(self.config.do_stable_layer_norm)

    @property
    def frame_stride(self) -> int:
        """Samples between two frames (320 for the released models: 20 ms at 16 kHz)."""
        return math.prod(self.config.conv_stride)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def num_frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Frames the feature encoder gives for ``num_samples`` samples (int or LongTensor)."""
        as_tensor = torch.as_tensor(num_samples)
        frames = conv_output_lengths(as_tensor, self.config.conv_kernel, self.config.conv_stride)
        return int(frames) if not torch.is_tensor(num_samples) else frames

    def sample_lengths(self, wav: torch.Tensor, wav_lens=None, attention_mask=None) -> torch.Tensor | None:
        """Real samples per waveform ``[batch]`` from SpeechBrain relative lengths ``wav_lens``
        (``round(wav_lens * samples)``) or an HF sample mask ``attention_mask`` ``[batch, samples]``
        (1 on real samples, right padding); None when neither is given."""
        if wav_lens is not None and attention_mask is not None:
            raise ValueError("give either `wav_lens` (relative lengths) or `attention_mask`, not both")
        if wav_lens is not None:
            wav_lens = torch.as_tensor(wav_lens, device=wav.device)
            return torch.round(wav_lens.float() * wav.shape[-1]).long()
        if attention_mask is not None:
            return attention_mask.long().sum(-1)
        return None

    def frame_padding_mask(self, wav: torch.Tensor, wav_lens=None, attention_mask=None):
        """``[batch, frames]`` bool, True on frames of real samples (None without lengths).

        Frame counts follow the convolution arithmetic, as transformers'
        ``_get_feature_vector_attention_mask`` does."""
        lengths = self.sample_lengths(wav, wav_lens, attention_mask)
        if lengths is None:
            return None
        frames = self.num_frames(lengths)
        if (frames < 1).any():
            shortest = int(lengths.min())
            kernels, strides = self.config.conv_kernel, self.config.conv_stride
            receptive = 1 + sum((k - 1) * math.prod(strides[:i]) for i, k in enumerate(kernels))
            raise ValueError(
                f"a waveform of {shortest} real samples is shorter than WavLM's receptive field "
                f"({receptive} samples) and gives no frame; check `wav_lens` or pad the input"
            )
        total = self.num_frames(wav.shape[-1])
        return torch.arange(total, device=wav.device)[None, :] < frames[:, None]

    # ---------------------------------------------------------------- embedding

    def normalize(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
                  segments: torch.Tensor | None = None) -> torch.Tensor:
        """Zero mean, unit variance over the real samples of each waveform; padding set to 0.
        (Same statistics as ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`` of
        transformers: biased variance, ``sqrt(var + 1e-7)``.) With ``segments`` (see
        :meth:`embed`) each segment is normalised over its own samples, and samples of no
        segment are set to 0."""
        if segments is None:
            if lengths is None:
                lengths = torch.full(wav.shape[:1], wav.shape[-1], device=wav.device, dtype=torch.long)
            segments = torch.where(torch.arange(wav.shape[-1], device=wav.device)[None, :] < lengths[:, None], 0, -1)
        out = torch.zeros_like(wav)
        for label in range(int(segments.max()) + 1):
            inside = segments == label
            count = inside.sum(-1, keepdim=True).clamp(min=1).to(wav.dtype)
            mean = (wav * inside).sum(-1, keepdim=True) / count
            var = (((wav - mean) * inside) ** 2).sum(-1, keepdim=True) / count
            out = torch.where(inside, (wav - mean) / torch.sqrt(var + 1e-7), out)
        return out

    def _segment_group_norm(self, feats: torch.Tensor, labels: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        """The first conv layer's GroupNorm (one group per channel: statistics over time) with
        statistics per segment: ``feats [batch, C, frames]``, ``labels [batch, frames]`` (-1: no
        segment; such frames are set to the norm's bias). A segment that is one run of frames
        in a sample (the usual case) is normalised by ``F.group_norm`` on that run, exactly as
        alone; other label patterns take the statistics with masked sums."""
        layouts = []  # per sample: its segments' runs of frames, in order
        for b in range(labels.shape[0]):
            runs = []
            for label in labels[b].unique().tolist():
                if label < 0:
                    continue
                where = (labels[b] == label).nonzero()[:, 0]
                lo, hi = int(where[0]), int(where[-1]) + 1
                if hi - lo != len(where):
                    return self._masked_group_norm(feats, labels, norm)
                runs.append((lo, hi))
            layouts.append(tuple(sorted(runs)))
        # Built from pieces, not by assigning into slices of one output (the backward of each
        # assignment copies the whole gradient): one call for a batch of one layout, else row by row
        bias = norm.bias.to(feats.dtype)[None, :, None]

        def normalised(x, runs):  # x [rows, C, frames]
            pieces, end = [], 0
            for lo, hi in runs:
                pieces += [bias.expand(x.shape[0], -1, lo - end),
                           F.group_norm(x[:, :, lo:hi], norm.num_groups, norm.weight, norm.bias, norm.eps)]
                end = hi
            pieces.append(bias.expand(x.shape[0], -1, x.shape[-1] - end))
            return torch.cat([p for p in pieces if p.shape[-1]], -1).to(feats.dtype)

        if len(set(layouts)) == 1:
            return normalised(feats, layouts[0])
        return torch.cat([normalised(x[None], runs) for x, runs in zip(feats.unbind(0), layouts)])

    @staticmethod
    def _masked_group_norm(feats: torch.Tensor, labels: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        """:meth:`_segment_group_norm` for any label pattern: per-segment sums as products with
        the one-hot labels."""
        dtype = feats.dtype
        x = feats.float()
        n_segments = int(labels.max()) + 1
        onehot = F.one_hot(labels + 1, n_segments + 1)[..., 1:].to(x.dtype)  # [B, T, S]
        count = onehot.sum(1).clamp(min=1.0)[:, None, :]  # [B, 1, S]
        spread = onehot.transpose(1, 2)  # [B, S, T]: segment statistics -> frames
        mean = torch.bmm(torch.bmm(x, onehot) / count, spread)  # 0 on frames of no segment
        centred = (x - mean) * (labels >= 0)[:, None, :].to(x.dtype)
        var = torch.bmm(centred.square(), onehot) / count
        normed = centred * torch.bmm(torch.rsqrt(var + norm.eps), spread)
        return (normed * norm.weight[:, None] + norm.bias[:, None]).to(dtype)

    def _positional_embedding(self, hidden: torch.Tensor, frame_labels: torch.Tensor | None) -> torch.Tensor:
        """WavLM's convolutional positional embedding; with ``frame_labels`` each segment's frames
        see only the frames of that segment (zero beyond, as the segment alone), and frames of
        no segment get none."""
        pos_conv = self.model.encoder.pos_conv_embed
        if frame_labels is None:
            return pos_conv(hidden)
        out = torch.zeros_like(hidden)
        for label in range(int(frame_labels.max()) + 1):
            inside = (frame_labels == label)[..., None].to(hidden.dtype)
            out = out + pos_conv(hidden * inside) * inside
        return out

    def embed(self, wav: torch.Tensor, wav_lens=None, attention_mask=None, segments=None):
        """Waveform -> input of the first transformer layer (``hidden_states[0]`` of HF).

        Conv feature encoder, feature projection (LayerNorm + Linear), padded frames set to zero,
        convolutional positional embedding added, then the encoder LayerNorm (post-LN base models
        only) and dropout.

        Arguments
        ---------
        wav : torch.Tensor
            ``[batch, samples]`` 16 kHz waveforms, right-padded.
        wav_lens : torch.Tensor, optional
            ``[batch]`` relative lengths in (0, 1] (SpeechBrain convention).
        attention_mask : torch.Tensor, optional
            ``[batch, samples]`` 1 on real samples (transformers convention), instead of wav_lens.
        segments : torch.Tensor, optional
            ``[batch, samples]`` integer label of every sample: ``0, 1, ...`` for the segments of
            the sequence (e.g. an enrolment and a mixture), -1 for samples of no segment
            (padding, separating silence). Given, nothing before the first layer mixes
            segments: the waveform normalisation (``normalize_wav``) and the GroupNorm of the
            first conv layer (``feat_extract_norm="group"``, the base models) take their
            statistics per segment (over the conv frames lying wholly inside it), and the
            positional convolution of a segment's frames sees only that segment. A frame wholly
            inside a segment then equals the frame of the segment run alone; frames of no
            segment (straddling a boundary, or in unlabelled samples) are blanked before the
            positional convolution. Without ``segments`` the computation is WavLM's own, whose
            GroupNorm statistics include the padding of a batch.

        Returns
        -------
        hidden : torch.Tensor
            ``[batch, frames, dim]``.
        padding_mask : torch.Tensor or None
            ``[batch, frames]`` True on real frames; None when no lengths were given.
        """
        if wav.dim() != 2:
            raise ValueError(f"expected waveforms [batch, samples], got shape {tuple(wav.shape)}")
        if segments is not None and segments.shape != wav.shape:
            raise ValueError(f"segments must label every sample: shape {tuple(wav.shape)}, got "
                             f"{tuple(segments.shape)}")
        grad = torch.is_grad_enabled() and not self.freeze
        cfg = self.config
        with torch.set_grad_enabled(grad):
            lengths = self.sample_lengths(wav, wav_lens, attention_mask)
            padding_mask = self.frame_padding_mask(wav, wav_lens, attention_mask)
            if self.normalize_wav:
                wav = self.normalize(wav, lengths, segments)
            with torch.set_grad_enabled(grad and not self.freeze_feature_extractor):
                feats = wav[:, None, :]
                for index, conv_layer in enumerate(self.model.feature_extractor.conv_layers):
                    if segments is not None and isinstance(getattr(conv_layer, "layer_norm", None), nn.GroupNorm):
                        labels = frame_segments(segments, cfg.conv_kernel[: index + 1], cfg.conv_stride[: index + 1])
                        feats = self._segment_group_norm(conv_layer.conv(feats), labels, conv_layer.layer_norm)
                        feats = conv_layer.activation(feats)
                    else:
                        feats = conv_layer(feats)
            hidden, _ = self.model.feature_projection(feats.transpose(1, 2))
            encoder = self.model.encoder
            frame_labels = None
            if segments is not None:
                frame_labels = frame_segments(segments, cfg.conv_kernel, cfg.conv_stride)
                hidden = hidden * (frame_labels >= 0)[..., None].to(hidden.dtype)
            elif padding_mask is not None:
                hidden = hidden * padding_mask[..., None].to(hidden.dtype)
            hidden = hidden + self._positional_embedding(hidden, frame_labels)
            if not self.stable_layer_norm:
                hidden = encoder.layer_norm(hidden)
            hidden = encoder.dropout(hidden)
        return hidden, padding_mask

    # ---------------------------------------------------------------- relative position bias

    def relative_position_bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor | None = None):
        """WavLM's (ungated) relative position bias for arbitrary frame positions.

        The bias depends only on ``key_position - query_position`` (bucketed by
        :func:`relative_position_bucket`, looked up in the first layer's embedding
        ``rel_attn_embed``, shared by all layers). Hence the bias of a contiguous slice of frames
        equals the corresponding block of the full sequence's bias, and frames taken out of a
        sequence keep their relations if you pass their original positions.

        Arguments
        ---------
        query_positions : torch.Tensor
            ``[queries]`` or ``[batch, queries]`` integer frame positions.
        key_positions : torch.Tensor, optional
            ``[keys]`` or ``[batch, keys]``; defaults to ``query_positions``.

        Returns
        -------
        torch.Tensor
            ``[heads, queries, keys]`` (1-D positions) or ``[batch, heads, queries, keys]``.
        """
        if key_positions is None:
            key_positions = query_positions
        table = self.model.encoder.layers[0].attention.rel_attn_embed
        query_positions = query_positions.to(table.weight.device).long()
        key_positions = key_positions.to(table.weight.device).long()
        relative = key_positions[..., None, :] - query_positions[..., :, None]
        buckets = relative_position_bucket(relative, self.config.num_buckets, self.config.max_bucket_distance)
        return table(buckets).movedim(-1, -3)

    # ---------------------------------------------------------------- transformer layers

    def _attention(self, attention, hidden, position_bias, extra_bias):
        """Self-attention of one WavLM layer with gated relative position bias plus extra bias.

        Gate (``WavLMAttention.forward`` of transformers; ``grep_linear``/``grep_a`` in unilm):
        per head, a Linear(head_dim -> 8) of the layer input summed in two groups of 4 gives
        ``a, b = sigmoid(.)``; ``gate = a * (b * gru_rel_pos_const - 1) + 2`` scales the bias row
        of every query. Logits are ``q k^T / sqrt(head_dim) + gate * position_bias + masks``.
        """
        batch, frames, dim = hidden.shape
        heads = attention.num_heads
        per_head = hidden.view(batch, frames, heads, dim // heads).transpose(1, 2)
        gate_logits = attention.gru_rel_pos_linear(per_head).view(batch, heads, frames, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(gate_logits).chunk(2, dim=-1)
        gate = gate_a * (gate_b * attention.gru_rel_pos_const - 1.0) + 2.0  # [batch, heads, frames, 1]
        bias = gate * position_bias.to(hidden.dtype)
        if extra_bias is not None:
            bias = bias + extra_bias.to(hidden.dtype)

        def split(proj):
            return proj(hidden).view(batch, frames, heads, dim // heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            split(attention.q_proj),
            split(attention.k_proj),
            split(attention.v_proj),
            attn_mask=bias,
            dropout_p=attention.dropout if self.model.training else 0.0,
        )
        return attention.out_proj(context.transpose(1, 2).reshape(batch, frames, dim))

    def _layer(self, layer, hidden, position_bias, extra_bias):
        """One encoder layer. Post-LN (base): x = LN(x + attn(x)); x = LN_f(x + FFN(x)).
        Pre-LN (large, ``do_stable_layer_norm``): x = x + attn(LN(x)); x = x + FFN(LN_f(x)).
        The gate of the position bias sees the attention input (normalised for pre-LN)."""
        if self.stable_layer_norm:
            attended = self._attention(layer.attention, layer.layer_norm(hidden), position_bias, extra_bias)
            hidden = hidden + layer.dropout(attended)
            return hidden + layer.feed_forward(layer.final_layer_norm(hidden))
        attended = self._attention(layer.attention, hidden, position_bias, extra_bias)
        hidden = layer.layer_norm(hidden + layer.dropout(attended))
        return layer.final_layer_norm(hidden + layer.feed_forward(hidden))

    def run_layers(
        self,
        hidden: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        attn_bias: AttnBias | None = None,
        position_bias: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ):
        """Run transformer layers ``start .. end-1`` on ``hidden``.

        Arguments
        ---------
        hidden : torch.Tensor
            ``[batch, frames, dim]`` input of layer ``start`` (from :meth:`embed` for 0, or an
            output of a previous call, possibly sliced or re-assembled).
        start, end : int
            Layer range, 0-based, ``end`` exclusive (default: up to the last layer).
        attn_bias : tensor, sequence or callable, optional
            Extra additive bias on the attention logits, broadcastable to
            ``[batch, heads, frames, frames]`` (e.g. :func:`segment_attention_bias`, or a
            per-key bias ``[batch, 1, 1, frames]``). A tensor applies to every layer of the range;
            a sequence gives one entry (or None) per layer; a callable ``f(layer_index, hidden)``
            is called with each layer's input (for biases that depend on the current features).
            Use :func:`mask_value` (finite) to mask keys.
        position_bias : torch.Tensor, optional
            Ungated relative position bias ``[heads, frames, frames]`` or ``[batch, heads, frames,
            frames]``, e.g. the one returned by a previous call. Default: computed from
            ``positions`` with :meth:`relative_position_bias` (what WavLM computes in layer 0 and
            reuses in every layer).
        padding_mask : torch.Tensor, optional
            ``[batch, frames]`` True on real frames; padded frames are removed as keys (queries at
            padded frames still produce values, as in transformers).
        positions : torch.Tensor, optional
            ``[frames]`` or ``[batch, frames]`` frame positions for the position bias; default
            ``0 .. frames-1``. Only used when ``position_bias`` is None.

        Returns
        -------
        outputs : list of torch.Tensor
            The output ``[batch, frames, dim]`` of every layer in the range (``end - start``
            tensors). For pre-LN models the encoder's final LayerNorm is applied to the output of
            the last layer of the network, as in transformers' ``hidden_states[-1]``.
        position_bias : torch.Tensor
            The ungated position bias used (4-D), to reuse in a later call on the same frames.
        """
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside 0 .. {self.num_layers}")
        batch, frames, _ = hidden.shape
        if position_bias is None:
            if positions is None:
                positions = torch.arange(frames, device=hidden.device)
            position_bias = self.relative_position_bias(positions)
        if position_bias.dim() == 3:
            position_bias = position_bias.unsqueeze(0)
        if position_bias.shape[-2:] != (frames, frames):
            raise ValueError(
                f"position_bias covers {tuple(position_bias.shape[-2:])} frames but hidden has {frames}; "
                "recompute it for the new sequence (pass position_bias=None and `positions`)"
            )
        if isinstance(attn_bias, Sequence) and len(attn_bias) != end - start:
            raise ValueError(f"attn_bias has {len(attn_bias)} entries for {end - start} layers")
        padding_bias = None
        if padding_mask is not None:
            real = padding_mask[:, None, None, :].to(hidden.device)
            padding_bias = attention_bias_from_mask(real, hidden.dtype)

        outputs = []
        for index in range(start, end):
            if isinstance(attn_bias, torch.Tensor) or attn_bias is None:
                extra = attn_bias
            elif callable(attn_bias):
                extra = attn_bias(index, hidden)
            else:
                extra = attn_bias[index - start]
            if padding_bias is not None:
                extra = padding_bias if extra is None else extra + padding_bias
            drop = self.model.training and index > 0 and self.layerdrop > 0
            skip = drop and float(torch.rand([])) < self.layerdrop
            if not skip:
                hidden = self._layer(self.model.encoder.layers[index], hidden, position_bias, extra)
            outputs.append(hidden)
        if self.stable_layer_norm and end == self.num_layers and outputs:
            outputs[-1] = self.model.encoder.layer_norm(outputs[-1])
        return outputs, position_bias

    # ---------------------------------------------------------------- whole model

    def hidden_states(self, wav: torch.Tensor, wav_lens=None, attention_mask=None,
                      segments=None) -> list[torch.Tensor]:
        """Input of the first layer and output of every layer: ``num_layers + 1`` tensors
        ``[batch, frames, dim]``, as ``WavLMModel(..., output_hidden_states=True).hidden_states``
        (``segments``: see :meth:`embed`)."""
        hidden, padding_mask = self.embed(wav, wav_lens, attention_mask, segments)
        outputs, _ = self.run_layers(hidden, padding_mask=padding_mask)
        return [hidden] + outputs

    def forward(self, wav: torch.Tensor, wav_lens=None, attention_mask=None, segments=None) -> torch.Tensor:
        """``[layers + 1, batch, frames, dim]``: all hidden states of :meth:`hidden_states`
        stacked (index 0 = transformer input, -1 = last layer). No gradient when frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return torch.stack(self.hidden_states(wav, wav_lens, attention_mask, segments))


def _folder_do_normalize(folder: str) -> bool:
    """``do_normalize`` of an HF folder's ``preprocessor_config.json`` (False if absent)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as handle:
        return bool(json.load(handle).get("do_normalize", False))

