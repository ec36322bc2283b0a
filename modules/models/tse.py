"""Target-speaker extraction (TSE) with WavLM: speaker-side modules, WavLMTasNet, WavLMDynamicTasNet.

Both models extract the speaker of an enrollment utterance from a mixture. They share the TasNet
skeleton of :mod:`modules.models.base` (learned encoder at a 10 ms hop, a sigmoid mask on the
mixture's encoding predicted by a :class:`~modules.models.convtasnet.TCN` head with ``n_src=1``, learned
decoder) and the WavLM lobe of :mod:`modules.models.wavlm` (frozen by default, fine-tunable). Input
``mix [batch, time]``, ``enroll [batch, time']`` with SpeechBrain relative lengths; output the
target estimate ``[batch, time]``.

* :class:`WavLMTasNet` runs WavLM twice. Mixture: softmax-weighted sum of every layer -> 1x1
  projection -> one TCN block at the WavLM frame rate (20 ms) -> interpolation to the encoder
  frames. Enrollment: :class:`MHFA` (multi-head factorised attentive pooling; J. Peng,
  T. Stafylakis, R. Gu, O. Plchot, L. Mosner, L. Burget, J. Cernocky, "An attention-based backend
  allowing efficient fine-tuning of transformer models for speaker verification", IEEE SLT 2022,
  arXiv:2210.01273) -> speaker embedding. :class:`SpeakerFusion` (multiply by default, add, concat
  or FiLM) -> 3 TCN blocks -> mask.
* :class:`WavLMDynamicTasNet` runs WavLM once over ``[enroll | silence | mix]``. The first ``N``
  layers use a block-diagonal ("hybrid") attention mask, the speaker is the mean of the enrolment
  frames after layer N, then only the mixture frames continue ("sequence switch") through the
  remaining layers, whose keys are biased towards target-like frames (QKb: ``s_t =
  sigmoid(cos(h_t, e))``). Softmax-weighted sum of the mixture frames of every layer -> 1x1
  projection -> 3 TCN blocks -> mask.

Fixes over the reference implementation of the dynamic model (each has a test in
``tests/test_tse.py``):

1. the hard QKb bias and the hybrid mask are finite in float32, bfloat16 and float16
   (:data:`SAFE_MASK`; ``-1e9`` is ``-inf`` in float16 and turns a fully masked row into NaN),
   and no query row is ever fully masked (batch padding shares the mixture segment);
2. a sample whose every key would be suppressed keeps its most target-like keys
   (``qkb_fallback_fraction`` of its frames, at least one) instead of attending uniformly;
3. ``qkb: soft`` gives a differentiable bias ``scale * cos(h_t, e)`` (learnable ``scale``, 5 at
   the start, as the author's later version of the reference) beside ``qkb: soft_log``
   (``scale * log(s_t)``), the hard threshold ``qkb: hard`` (``s_t < tau`` suppressed) and
   ``qkb: none``;
4. after the sequence switch the relative position bias is recomputed for the mixture-only
   sequence (positions 0 .. frames-1 of each mixture);
5. enrolments and mixtures of different lengths in one batch: every segment starts on a WavLM
   frame boundary, each sample has its own segment boundaries and padding masks, and the mixture
   frames are gathered per sample (:func:`sequence_layout`);
6. nothing before layer N mixes enrolment and mixture: WavLM takes its statistics per segment
   (first-layer GroupNorm of the base models, waveform normalisation, positional convolution:
   ``segments`` of :meth:`~modules.models.wavlm.WavLM.embed`), so the mixture's states up to
   layer N are those of the mixture alone and the enrolment reaches the output only through
   the speaker ``e`` (QKb).

Both models: each sample of a batch of different lengths gives what it gives alone (tested to
1e-5, both WavLM front ends): WavLM's statistics are taken over each sample's own samples, and
every gLN of the TCN blocks over the sample's valid frames (:class:`MaskedGlobalLayerNorm`).

Options for details of the reference's code (JunyiPeng00/wesep, ``wesep/models/wavlm_tasnet.py``,
``wavlm_dynamic_tasnet.py``; its first version and the author's later one) are listed in each
model's docstring; the defaults are the design's.

Shapes: waveforms ``[batch, samples]``; WavLM states ``[batch, frames, dim]``; TasNet
representations ``[batch, channels, frames]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.models.base import Decoder, Encoder, EncoderMaskerDecoder, GlobalLayerNorm
from modules.models.convtasnet import TCN, TemporalBlock
from modules.models.losses import si_snr
from modules.models.speaker import GE2E_DIM, GE2EEncoder
from modules.models.wavlm import WavLM, conv_output_lengths, mask_value, segment_attention_bias

__all__ = [
    "LayerWeights",
    "MHFA",
    "mean_pooling",
    "SpeakerTransform",
    "SpeakerFusion",
    "FUSION_MODES",
    "SPEAKER_ENCODERS",
    "QKB_MODES",
    "align_frames",
    "receptive_field_samples",
    "SequenceLayout",
    "sequence_layout",
    "qkb_scores",
    "qkb_key_bias",
    "extraction_metrics",
    "EXTRACTION_METRICS",
    "MaskedGlobalLayerNorm",
    "use_masked_norms",
    "valid_frames",
    "LearnedUpsampling",
    "MASK_ACTIVATIONS",
    "UPSAMPLING",
    "WavLMTasNet",
    "WavLMDynamicTasNet",
]

FUSION_MODES = ("multiply", "add", "concat", "film")
QKB_MODES = ("hard", "soft", "soft_log", "none")
SPEAKER_ENCODERS = ("mhfa", "ge2e")


# --------------------------------------------------------------------------------------------
# Speaker side
# --------------------------------------------------------------------------------------------


def _stack_layers(hidden) -> torch.Tensor:
    """``[layers, batch, frames, dim]`` from a stacked tensor or a sequence of tensors."""
    return hidden if torch.is_tensor(hidden) else torch.stack(list(hidden))


class LayerWeights(nn.Module):
    """Softmax-weighted sum of layer outputs (weights start equal).

    ``[layers, batch, frames, dim]`` (or a list of ``[batch, frames, dim]``) -> ``[batch, frames, dim]``.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def forward(self, hidden) -> torch.Tensor:
        hidden = _stack_layers(hidden)
        if hidden.shape[0] != self.logits.numel():
            raise ValueError(f"expected {self.logits.numel()} layers, got {hidden.shape[0]}")
        weights = torch.softmax(self.logits, 0).to(hidden.dtype)
        return torch.einsum("l,lbtd->btd", weights, hidden)


def mean_pooling(hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the real frames: ``[batch, frames, dim]``, mask ``[batch, frames]`` -> ``[batch, dim]``."""
    if padding_mask is None:
        return hidden.mean(1)
    weights = padding_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MHFA(nn.Module):
    """Multi-head factorised attentive pooling (Peng et al., SLT 2022; see the module docstring).

    Keys and values are two separate softmax-weighted sums of the WavLM layers (the "factorised"
    part: keys pick the layers that say *where* to look, values the layers that say *what* a
    speaker sounds like), each compressed by a linear layer to ``compression_dim``. A linear layer
    on the keys gives ``num_heads`` attention logits per frame; a softmax over the (real) frames
    pools the values once per head; the heads are concatenated and projected to ``embed_dim``.

    Arguments
    ---------
    num_layers : int
        Number of hidden states given (transformer layers + 1 for the input of the first layer).
    input_dim : int
        WavLM width (768 for base).
    compression_dim, num_heads, embed_dim : int
        128, 8 and 256 as in the paper's base configuration.

    Shapes: ``hidden [layers, batch, frames, input_dim]``, ``padding_mask [batch, frames]`` ->
    ``[batch, embed_dim]``.
    """

    def __init__(self, num_layers: int, input_dim: int, compression_dim: int = 128,
                 num_heads: int = 8, embed_dim: int = 256):
        super().__init__()
        self.key_weights = LayerWeights(num_layers)
        self.value_weights = LayerWeights(num_layers)
        self.key_proj = nn.Linear(input_dim, compression_dim)
        self.value_proj = nn.Linear(input_dim, compression_dim)
        self.head_logits = nn.Linear(compression_dim, num_heads)
        self.output = nn.Linear(num_heads * compression_dim, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, hidden, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = _stack_layers(hidden)
        keys = self.key_proj(self.key_weights(hidden))  # [batch, frames, C]
        values = self.value_proj(self.value_weights(hidden))  # [batch, frames, C]
        logits = self.head_logits(keys)  # [batch, frames, heads]
        if padding_mask is not None:
            logits = logits.masked_fill(~padding_mask[..., None], mask_value(logits.dtype))
        attention = torch.softmax(logits, dim=1)
        pooled = torch.einsum("bth,btc->bhc", attention, values)
        return self.output(pooled.flatten(1))


class SpeakerTransform(nn.Module):
    """The reference's transform of a speaker embedding before fusion: three 1x1 convolutions on
    the embedding (here linear layers, the same thing on a vector) ``emb_dim -> hidden -> hidden
    -> emb_dim`` with a tanh after the second (``SpeakerTransform`` of JunyiPeng00/wesep,
    ``wesep/modules/common/speaker.py``, 3 layers, hidden 128). ``[batch, emb_dim]`` -> same."""

    def __init__(self, emb_dim: int, hidden: int = 128):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb_dim, hidden), nn.Linear(hidden, hidden), nn.Tanh(),
                                    nn.Linear(hidden, emb_dim))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class SpeakerFusion(nn.Module):
    """Condition features ``[batch, channels, frames]`` on a speaker embedding ``[batch, emb_dim]``.

    With ``speaker_transform`` the embedding first passes a :class:`SpeakerTransform` (the
    reference's; default off: the design's single linear layer). Then a linear layer takes it
    to the feature width (``t(e)``, broadcast over frames), and:

    * ``multiply`` (default, as the reference): ``x * t(e)``;
    * ``add``: ``x + t(e)``;
    * ``concat``: 1x1 convolution of ``[x ; t(e)]`` back to ``channels``;
    * ``film``: ``x * (1 + gamma(e)) + beta(e)`` (feature-wise linear modulation, Perez et al.,
      AAAI 2018), starting as the identity on ``x``.
    """

    def __init__(self, channels: int, emb_dim: int, mode: str = "multiply", speaker_transform: bool = False):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {mode!r}; choose one of {list(FUSION_MODES)}")
        self.mode = mode
        self.speaker_transform = SpeakerTransform(emb_dim) if speaker_transform else None
        self.transform = nn.Linear(emb_dim, 2 * channels if mode == "film" else channels)
        if mode == "film":  # gamma = beta = 0 at the start
            nn.init.zeros_(self.transform.weight)
            nn.init.zeros_(self.transform.bias)
        self.mix = nn.Conv1d(2 * channels, channels, 1) if mode == "concat" else None

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if self.speaker_transform is not None:
            embedding = self.speaker_transform(embedding)
        t = self.transform(embedding)[..., None].to(x.dtype)  # [batch, channels(*2), 1]
        if self.mode == "multiply":
            return x * t
        if self.mode == "add":
            return x + t
        if self.mode == "film":
            gamma, beta = t.chunk(2, dim=1)
            return x * (1 + gamma) + beta
        return self.mix(torch.cat([x, t.expand(-1, -1, x.shape[-1])], dim=1))


# --------------------------------------------------------------------------------------------
# Frame bookkeeping
# --------------------------------------------------------------------------------------------


def receptive_field_samples(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Samples seen by one output frame of a stack of 1-D convolutions (400 for WavLM base)."""
    return 1 + sum((k - 1) * math.prod(strides[:i]) for i, k in enumerate(kernels))


def align_frames(x: torch.Tensor, out_frames: int, out_stride: float, out_offset: float,
                 in_stride: float, in_offset: float, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Resample a frame sequence onto another frame grid of the same waveform by linear interpolation.

    Frame ``i`` of the input is centred on sample ``in_offset + i * in_stride``, frame ``j`` of the
    output on ``out_offset + j * out_stride``; each output frame takes the input interpolated at
    its centre, clamped to the first/last real input frame (``lengths [batch]`` real input frames;
    default all).

    ``x [batch, channels, in_frames]`` -> ``[batch, channels, out_frames]``.
    """
    batch, channels, in_frames = x.shape
    if lengths is None:
        lengths = torch.full((batch,), in_frames, device=x.device)
    last = (lengths.to(x.device).clamp(min=1) - 1).to(torch.float64)[:, None]
    centres = out_offset + out_stride * torch.arange(out_frames, device=x.device, dtype=torch.float64)
    position = ((centres - in_offset) / in_stride)[None, :].clamp(min=0.0)
    position = torch.minimum(position, last)  # [batch, out_frames]
    left = position.floor().long()
    right = torch.minimum(left + 1, last.long())
    frac = (position - left).to(x.dtype)[:, None, :]

    def take(index):
        return torch.gather(x, 2, index[:, None, :].expand(-1, channels, -1))

    return take(left) * (1 - frac) + take(right) * frac


@dataclass
class SequenceLayout:
    """Where each segment of ``[enroll | silence | mix]`` lies, per sample (all ``[batch]`` long).

    Samples: the enrolment occupies ``[0, enroll_samples)``, zeros follow up to
    ``mix_start_sample`` (padding of the enrolment to a whole number of frames, then the
    silence), the mixture ``[mix_start_sample, total_samples)``. Frames: ``[0, enroll_frames)``
    see only enrolment samples; ``[enroll_frames, mix_start_frame)`` are the silence segment (the
    frames that straddle the end of the enrolment count as silence); ``[mix_start_frame,
    total_frames)`` are exactly the frames WavLM gives for the mixture alone (``mix_frames`` of
    them), because ``mix_start_sample`` is a multiple of the frame stride.
    """

    enroll_samples: torch.Tensor
    mix_samples: torch.Tensor
    mix_start_sample: torch.Tensor
    total_samples: torch.Tensor
    enroll_frames: torch.Tensor
    mix_start_frame: torch.Tensor
    mix_frames: torch.Tensor
    total_frames: torch.Tensor

    def segment_ids(self, frames: int) -> torch.Tensor:
        """``[batch, frames]``: 0 enrolment, 1 silence, 2 mixture and the batch padding after it.

        The padding shares the mixture's id so that no query row is ever left without a key
        (the padding mask removes the padded keys): a fully masked row would be NaN wherever a
        cast to float16 (autocast) turns the additive mask into ``-inf``."""
        t = torch.arange(frames, device=self.total_frames.device)[None, :]
        ids = torch.full((len(self.total_frames), frames), 2, dtype=torch.long, device=t.device)
        ids = torch.where(t < self.mix_start_frame[:, None], 1, ids)
        return torch.where(t < self.enroll_frames[:, None], 0, ids)

    def sample_segments(self, samples: int) -> torch.Tensor:
        """``[batch, samples]`` segments for :meth:`~modules.models.wavlm.WavLM.embed`: 0 on
        the enrolment's samples, 1 on the mixture's, -1 on the rest (the enrolment's zero
        padding, the silence, the batch padding)."""
        t = torch.arange(samples, device=self.total_samples.device)[None, :]
        ids = torch.full((len(self.total_samples), samples), -1, dtype=torch.long, device=t.device)
        ids = torch.where(t < self.enroll_samples[:, None], 0, ids)
        in_mix = (t >= self.mix_start_sample[:, None]) & (t < self.total_samples[:, None])
        return torch.where(in_mix, 1, ids)


def sequence_layout(enroll_samples: torch.Tensor, mix_samples: torch.Tensor, silence_samples: int,
                    kernels: Sequence[int], strides: Sequence[int]) -> SequenceLayout:
    """Segment boundaries of ``[enroll | silence | mix]`` for each sample (see :class:`SequenceLayout`).

    The enrolment is zero-padded to a multiple of the frame stride and the silence rounded up to
    one, so that the mixture starts on a frame boundary whatever the lengths.
    """
    stride = math.prod(strides)
    enroll_samples, mix_samples = enroll_samples.long(), mix_samples.long()
    silence = -(-int(silence_samples) // stride) * stride
    enroll_padded = -(-enroll_samples // stride) * stride
    mix_start = enroll_padded + silence
    frames = lambda n: conv_output_lengths(n, kernels, strides)  # noqa: E731
    layout = SequenceLayout(
        enroll_samples=enroll_samples, mix_samples=mix_samples, mix_start_sample=mix_start,
        total_samples=mix_start + mix_samples, enroll_frames=frames(enroll_samples),
        mix_start_frame=mix_start // stride, mix_frames=frames(mix_samples),
        total_frames=mix_start // stride + frames(mix_samples))
    receptive = receptive_field_samples(kernels, strides)
    for name, n in (("enrolment", enroll_samples), ("mixture", mix_samples)):
        if (n < receptive).any():
            raise ValueError(f"a {name} of {int(n.min())} samples is shorter than one WavLM frame "
                             f"({receptive} samples); give a longer {name}")
    return layout


# --------------------------------------------------------------------------------------------
# QKb: query-key bias towards target-like frames
# --------------------------------------------------------------------------------------------

# The additive mask of this module: finite in float32, bfloat16 *and* float16 (so also after
# autocast casts a float32 bias to float16), and still exactly zero weight after the softmax.
SAFE_MASK = mask_value(torch.float16)


def qkb_scores(hidden: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
    """Target-likeness ``s_t = sigmoid(cos(h_t, e))`` of every frame: ``[batch, frames, dim]``,
    ``[batch, dim]`` -> ``[batch, frames]`` in (0.27, 0.73)."""
    cos = F.cosine_similarity(hidden.float(), speaker.float()[:, None, :], dim=-1, eps=1e-6)
    return torch.sigmoid(cos)


def qkb_key_bias(scores: torch.Tensor, mode: str = "hard", tau: float = 0.5,
                 padding_mask: torch.Tensor | None = None, scale: torch.Tensor | float = 1.0,
                 fallback_fraction: float = 0.1, dtype: torch.dtype = torch.float32):
    """Additive per-key attention bias from target-likeness scores.

    Arguments
    ---------
    scores : torch.Tensor
        ``[batch, frames]`` from :func:`qkb_scores`.
    mode : str
        ``hard``: keys with ``s_t < tau`` get :data:`SAFE_MASK` (float16's
        :func:`~modules.models.wavlm.mask_value`: finite in every dtype, zero weight after the softmax),
        the others 0; no gradient reaches the scores. ``soft``: ``scale * cos(h_t, e)``
        (``= scale * logit(s_t)``; differentiable, a range of ``2 * scale`` nats; ``scale`` may
        be a learnable tensor). ``soft_log``: ``scale * log(s_t)`` (differentiable, at most
        about one nat of range per unit of scale). ``none``: no bias.
    padding_mask : torch.Tensor, optional
        ``[batch, frames]`` True on real frames (padding is masked elsewhere; here it only
        decides which keys count as real for the fallback).
    fallback_fraction : float
        Hard mode: when *every* real key of a sample would be suppressed, keep instead its
        ``max(1, ceil(fallback_fraction * real frames))`` most target-like keys. 0 disables
        the fallback (the reference's behaviour: uniform attention over the masked keys).

    Returns
    -------
    bias : torch.Tensor or None
        ``[batch, 1, 1, frames]`` in ``dtype``.
    fallback : torch.Tensor or None
        ``[batch]`` bool, True where the fallback was used (hard mode).
    """
    if mode == "none":
        return None, None
    if mode in ("soft", "soft_log"):
        bias = scale * (torch.logit(scores) if mode == "soft" else torch.log(scores))
        return bias.clamp(min=SAFE_MASK).to(dtype)[:, None, None, :], None
    if mode != "hard":
        raise ValueError(f"unknown QKb mode {mode!r}; choose one of {list(QKB_MODES)}")
    real = torch.ones_like(scores, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    allowed = (scores >= tau) & real
    fallback = ~allowed.any(-1) & (fallback_fraction > 0)
    if fallback.any():
        n_real = real.sum(-1)
        keep = torch.clamp(torch.ceil(fallback_fraction * n_real.float()).long(), min=1)
        order = scores.masked_fill(~real, -float("inf")).argsort(-1, descending=True)
        positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order).contiguous()
        rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank of every key
        best = (rank < keep[:, None]) & real
        allowed = torch.where(fallback[:, None], best, allowed)
    zero = torch.zeros((), dtype=dtype, device=scores.device)
    bias = torch.where(allowed, zero, torch.tensor(SAFE_MASK, dtype=dtype, device=scores.device))
    return bias[:, None, None, :], fallback


# --------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------

EXTRACTION_METRICS = ("si-sdr", "si-sdr_i", "si-sdr_interferer", "confused")


def extraction_metrics(mix: torch.Tensor, est: torch.Tensor, target: torch.Tensor,
                       interferer: torch.Tensor) -> dict:
    """Scores of one extracted utterance (all ``[time]``): SI-SDR of the estimate against the
    target, its improvement over the mixture, SI-SDR against the interferer, and ``confused`` =
    1.0 when the estimate is closer to the interferer than to the target (the wrong speaker was
    extracted), else 0.0. SI-SDR is :func:`modules.models.losses.si_snr` (Le Roux et al., 2019)."""
    est, target, interferer, mix = (x.float() for x in (est, target, interferer, mix))
    to_target, to_interferer = float(si_snr(est, target)), float(si_snr(est, interferer))
    return {"si-sdr": to_target, "si-sdr_i": to_target - float(si_snr(mix, target)),
            "si-sdr_interferer": to_interferer, "confused": float(to_interferer > to_target)}


# --------------------------------------------------------------------------------------------
# Valid frames of a ragged batch; upsampling
# --------------------------------------------------------------------------------------------


class MaskedGlobalLayerNorm(GlobalLayerNorm):
    """gLN that can take its statistics over the valid frames of each sample only.

    Outside :func:`valid_frames` (``frame_mask`` None) it is :class:`GlobalLayerNorm`, computed
    the same way. Inside ``with valid_frames(module, mask)`` (``mask [batch, frames]``, True on
    valid frames) each sample's mean and variance come from its valid frames, and the output is
    zero on the other frames: a following convolution then sees zeros past a sample's end, as
    its own zero padding, so a sample padded in a batch gives on its valid frames what it gives
    alone. Same parameters as gLN (``gamma``, ``beta``).
    """

    frame_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.frame_mask
        if mask is None:
            return super().forward(x)
        c_dim = 2 if self.channels_last else 1
        gamma, beta = self.affine()
        weight = mask.unsqueeze(c_dim).to(x.dtype)  # [batch, frames, 1] or [batch, 1, frames]
        count = weight.sum((1, 2), keepdim=True).clamp(min=1.0) * x.shape[c_dim]
        mean = (x * weight).sum((1, 2), keepdim=True) / count
        centred = (x - mean) * weight
        var = centred.square().sum((1, 2), keepdim=True) / count
        return (centred * (gamma * torch.rsqrt(var + self.eps)) + beta) * weight


def use_masked_norms(module: nn.Module) -> nn.Module:
    """Replace every :class:`GlobalLayerNorm` inside ``module`` by a :class:`MaskedGlobalLayerNorm`
    with the same parameters (in place; returns ``module``)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GlobalLayerNorm:
                masked = MaskedGlobalLayerNorm(child.gamma.shape[1], child.eps, child.channels_last)
                masked.load_state_dict(child.state_dict())
                setattr(parent, name, masked.to(child.gamma.device, child.gamma.dtype))
    return module


@contextlib.contextmanager
def valid_frames(module: nn.Module, mask: torch.Tensor | None):
    """Within the block, every :class:`MaskedGlobalLayerNorm` of ``module`` uses ``mask``
    (``[batch, frames]``, True on valid frames). A None or all-True mask leaves them plain gLN."""
    norms = [m for m in module.modules() if isinstance(m, MaskedGlobalLayerNorm)]
    if mask is not None and bool(mask.all()):
        mask = None
    for norm in norms:
        norm.frame_mask = mask
    try:
        yield
    finally:
        for norm in norms:
            norm.frame_mask = None


def _frame_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """``[batch, frames]`` True on the first ``lengths[b]`` frames."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class LearnedUpsampling(nn.Module):
    """Learnable 2x upsampling in time, initialised as linear interpolation.

    A transposed convolution (kernel 4, stride 2, no bias) whose weights start with
    ``[0.25, 0.75, 0.75, 0.25]`` from each channel to itself: output frame ``2m`` is
    ``0.75 x[m] + 0.25 x[m-1]``, frame ``2m+1`` is ``0.75 x[m] + 0.25 x[m+1]`` (zeros beyond the
    input). The layer and its initialisation are those of the author's later version of the
    reference (``wesep/models/wavlm_tasnet.py`` and ``wavlm_dynamic_tasnet.py`` of
    JunyiPeng00/wesep), which crops one output at each end (``padding=1``); here only the first
    is dropped, so output ``2 * frames`` (``0.25 x[-1]``) is kept and a sample padded with zero
    frames in a batch gives what it gives alone. ``[batch, C, frames]`` -> ``[batch, C,
    out_frames]``: the ``2 * frames + 1`` outputs, cut or zero-padded at the end.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(channels, channels, 4, stride=2, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            index = torch.arange(channels)
            self.conv.weight[index, index] = torch.tensor([0.25, 0.75, 0.75, 0.25])

    def forward(self, x: torch.Tensor, out_frames: int) -> torch.Tensor:
        y = self.conv(x)[..., 1:]  # output 0 lies half a frame before the input's first frame
        if y.shape[-1] >= out_frames:
            return y[..., :out_frames]
        return F.pad(y, (0, out_frames - y.shape[-1]))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

MASK_ACTIVATIONS = ("sigmoid", "relu")
UPSAMPLING = ("interpolate", "learned")


def _sample_lengths(wav: torch.Tensor, lens) -> torch.Tensor:
    """Real samples per waveform from SpeechBrain relative lengths (all samples when None)."""
    if lens is None:
        return torch.full((wav.shape[0],), wav.shape[-1], dtype=torch.long, device=wav.device)
    return torch.round(torch.as_tensor(lens, device=wav.device).float() * wav.shape[-1]).long()


def _real_sample_segments(wav: torch.Tensor, lens) -> torch.Tensor:
    """``segments`` for :meth:`~modules.models.wavlm.WavLM.embed`: 0 on real samples, -1 on padding."""
    real = _frame_mask(_sample_lengths(wav, lens), wav.shape[-1])
    return torch.where(real, 0, -1)


class _WavLMExtractor(EncoderMaskerDecoder):
    """Shared part of the two models.

    TasNet encoder/decoder; the mask head (:class:`~modules.models.convtasnet.TCN` with
    ``n_src=1``, ``mask_blocks`` blocks of dilations 1, 2, 4, ...; sigmoid or ReLU mask); the
    mixture's WavLM-rate path (:meth:`mix_features`: softmax-weighted sum of the layers, 1x1
    projection to ``encoder_dim``, ``mix_blocks`` TCN blocks at the WavLM rate after the
    projection or, with ``mix_blocks_before_proj``, at WavLM's width before it, then
    interpolation or learned upsampling onto the encoder frames); and the valid frames of a
    ragged batch (every gLN of these blocks takes its statistics over a sample's valid frames).
    Subclasses implement :meth:`condition` (features ``[batch, encoder_dim, encoder frames]``).
    """

    def __init__(self, wavlm: WavLM, encoder_dim=512, kernel_size=320, stride=160, bottleneck=256,
                 hidden=512, skip=256, mask_blocks=3, norm="gLN", mask_act="sigmoid", mix_blocks=0,
                 mix_blocks_before_proj=False, upsample="interpolate", encoder_features=False):
        if mask_act not in MASK_ACTIVATIONS:
            raise ValueError(f"unknown mask_act {mask_act!r}; choose one of {list(MASK_ACTIVATIONS)}")
        if upsample not in UPSAMPLING:
            raise ValueError(f"unknown upsample {upsample!r}; choose one of {list(UPSAMPLING)}")
        super().__init__(
            Encoder(kernel_size, encoder_dim, stride=stride),
            TCN(encoder_dim, B=bottleneck, H=hidden, Sc=skip, P=3, X=mask_blocks, R=1, n_src=1,
                norm=norm, mask_act=mask_act),
            Decoder(kernel_size, encoder_dim, stride=stride),
        )
        self.wavlm = wavlm
        self.encoder_dim = encoder_dim
        cfg = wavlm.config
        self.wavlm_receptive = receptive_field_samples(cfg.conv_kernel, cfg.conv_stride)
        self.mix_weights = LayerWeights(wavlm.num_layers + 1)
        self.mix_proj = nn.Conv1d(wavlm.hidden_size, encoder_dim, 1)
        # blocks at the WavLM rate, dilations 1, 2, 4, ...; the skip output is the residual branch
        width = wavlm.hidden_size if mix_blocks_before_proj else encoder_dim
        self.mix_blocks_before_proj = bool(mix_blocks_before_proj)
        self.mix_blocks = nn.ModuleList(TemporalBlock(width, hidden, width, 3, 2**i, norm=norm, residual=False)
                                        for i in range(int(mix_blocks)))
        self.upsampler = None
        if upsample == "learned":
            if wavlm.frame_stride != 2 * stride:
                raise ValueError(f"upsample='learned' doubles the frame rate, but WavLM frames are "
                                 f"{wavlm.frame_stride} samples apart and encoder frames {stride}; use "
                                 f"upsample='interpolate' or an encoder stride of {wavlm.frame_stride / 2:g}")
            self.upsampler = LearnedUpsampling(encoder_dim)
        # the mixture's TasNet encoding, normalised, added to the WavLM-rate features
        self.encoder_norm = MaskedGlobalLayerNorm(encoder_dim) if encoder_features else None
        use_masked_norms(self.masker)
        use_masked_norms(self.mix_blocks)

    def min_samples(self) -> tuple[int, int]:
        """Shortest (mixture, enrolment) in samples: one encoder frame and one WavLM frame."""
        return max(self.encoder.kernel_size, self.wavlm_receptive), self.wavlm_receptive

    def to_encoder_frames(self, x: torch.Tensor, out_frames: int, lengths=None) -> torch.Tensor:
        """WavLM-rate features ``[batch, C, wavlm frames]`` -> ``[batch, C, out_frames]`` on the
        encoder grid (frame centres matched in samples; for the released WavLM 20 ms -> 10 ms)."""
        enc = self.encoder
        return align_frames(x, out_frames, enc.stride, enc.kernel_size / 2, self.wavlm.frame_stride,
                            self.wavlm_receptive / 2, lengths)

    def mix_features(self, hidden, wavlm_frames: torch.Tensor, out_frames: int) -> torch.Tensor:
        """The mixture's WavLM states (``[layers + 1, batch, frames, dim]`` or a list) with
        ``wavlm_frames [batch]`` valid frames -> ``[batch, encoder_dim, out_frames]``."""
        x = self.mix_weights(hidden).transpose(1, 2)  # [batch, dim, frames]
        mask = _frame_mask(wavlm_frames.to(x.device), x.shape[-1])
        if self.mix_blocks_before_proj:
            x = self._wavlm_rate_blocks(x, mask)
        x = self.mix_proj(x)
        if not self.mix_blocks_before_proj:
            x = self._wavlm_rate_blocks(x, mask)
        if self.upsampler is not None:  # invalid frames set to zero, as past the end of a sample alone
            return self.upsampler(x * mask[:, None].to(x.dtype), out_frames)
        return self.to_encoder_frames(x, out_frames, wavlm_frames)

    def _wavlm_rate_blocks(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with valid_frames(self.mix_blocks, mask):
            for block in self.mix_blocks:
                _, skip = block(x)
                x = x + skip
        return x

    def encoder_frames(self, mix_samples: torch.Tensor, length: int) -> torch.Tensor:
        """Encoder frames of mixtures of ``mix_samples [batch]`` real samples padded to
        ``length``: the frames each mixture gives alone (the encoder appends ``padding_for``
        zeros)."""
        enc = self.encoder
        pad = enc.padding_for(length)
        return conv_output_lengths(mix_samples + pad, [enc.kernel_size], [enc.stride])

    def with_encoding(self, x: torch.Tensor, w: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """``x`` plus the gLN-normalised TasNet encoding ``w`` (both ``[batch, encoder_dim,
        frames]``; statistics over the ``frame_mask`` frames) with ``encoder_features``; else ``x``."""
        if self.encoder_norm is None:
            return x
        with valid_frames(self.encoder_norm, frame_mask):
            return x + self.encoder_norm(w)

    def condition(self, mix, enroll, mix_lens, enroll_lens, w, frame_mask):
        """Mask-head input ``[batch, encoder_dim, frames]`` from the waveforms, the mixture's
        encoding ``w`` and its valid encoder frames ``frame_mask [batch, frames]``."""
        raise NotImplementedError

    def forward(self, mix: torch.Tensor, enroll: torch.Tensor, mix_lens=None, enroll_lens=None):
        """``mix [batch, time]``, ``enroll [batch, time']`` (relative lengths optional) ->
        target estimate ``[batch, time]``. Each sample of a batch gives on its real samples what
        it gives alone (up to float rounding), whatever the padding holds."""
        if mix.dim() == 1:
            mix = mix.unsqueeze(0)
        if enroll.dim() == 1:
            enroll = enroll.unsqueeze(0)
        if mix.dim() != 2 or enroll.dim() != 2 or mix.shape[0] != enroll.shape[0]:
            raise ValueError(f"expected mix [batch, time] and enroll [batch, time'] with the same batch, "
                             f"got {tuple(mix.shape)} and {tuple(enroll.shape)}")
        mix_samples = _sample_lengths(mix, mix_lens)
        if mix_lens is not None:  # the encoder sees zeros past a mixture's end, as alone
            mix = mix * _frame_mask(mix_samples, mix.shape[-1]).to(mix.dtype)
        w = self.encode(mix)
        frame_mask = _frame_mask(self.encoder_frames(mix_samples, mix.shape[-1]), w.shape[-1])
        features = self.condition(mix, enroll, mix_lens, enroll_lens, w, frame_mask)
        with valid_frames(self.masker, frame_mask):
            masks = self.masker(features)  # [batch, 1, encoder_dim, frames]
        return self.decode(self.apply_masks(w, masks), mix.shape[-1])[..., 0]


class WavLMTasNet(_WavLMExtractor):
    """Two-pass WavLM TSE model (see the module docstring).

    Arguments
    ---------
    wavlm : modules.models.wavlm.WavLM
        The lobe (its ``freeze`` decides frozen or fine-tuned).
    encoder_dim, kernel_size, stride : int
        TasNet encoder: 512 filters of 320 samples every 160 (20 ms window, 10 ms hop at 16 kHz).
    bottleneck, hidden, skip : int
        Channels of the TCN blocks (B, H, Sc of Conv-TasNet).
    mask_blocks : int
        TCN blocks after the fusion (3: dilations 1, 2, 4).
    fusion : str
        ``multiply`` (default, the design and the reference's first version), ``add``,
        ``concat`` or ``film`` (the author's later version) (:class:`SpeakerFusion`).
    mhfa_compression, mhfa_heads, speaker_dim : int
        :class:`MHFA` sizes (128, 8, 256).
    norm : str
        Normalisation of the TCN blocks (gLN).
    speaker_transform : bool
        False (default, the design): one linear layer takes the embedding to the fusion; True:
        the reference's :class:`SpeakerTransform` first.
    mix_blocks : int
        TCN blocks on the mixture at the WavLM rate (dilations 1, 2, 4, ...): 1 (default, the
        design and the reference's first version) or 4 (the later version).
    mix_blocks_before_proj : bool
        False (default, the design): those blocks run after the 1x1 projection, at
        ``encoder_dim`` channels; True (the reference, both versions): before it, at WavLM's
        width (768 for base).
    upsample : str
        ``interpolate`` (default, the design and the reference's first version: linear
        interpolation at matched frame centres) or ``learned`` (the later version:
        :class:`LearnedUpsampling`, needs WavLM frames twice the encoder's stride).
    mask_act : str
        ``sigmoid`` (default, the design and the first version) or ``relu`` (the later version).
    speaker_encoder : str
        ``mhfa`` (default, the design): :class:`MHFA` over WavLM's states of the enrolment,
        trained with the model; ``ge2e``: the pretrained GE2E d-vector encoder
        (:class:`modules.models.speaker.GE2EEncoder`, 256 dims, frozen, its embedding of each
        enrolment cached), which knows speakers before any training; ``speaker_dim`` is then 256.
    sample_rate : int
        Rate of the input; used by the GE2E encoder (which resamples to 16 kHz inside).
    encoder_features : bool
        False (default, the design and the reference): the mask head sees the mixture only
        through WavLM; True: the gLN-normalised TasNet encoding of the mixture is added to the
        WavLM-rate features before the fusion, so the mask head also sees the mixture at the
        encoder's resolution, as Conv-TasNet's and SpeakerBeam's mask networks do.
    """

    def __init__(self, wavlm: WavLM, encoder_dim=512, kernel_size=320, stride=160, bottleneck=256,
                 hidden=512, skip=256, mask_blocks=3, fusion="multiply", mhfa_compression=128,
                 mhfa_heads=8, speaker_dim=256, norm="gLN", speaker_transform=False, mix_blocks=1,
                 mix_blocks_before_proj=False, upsample="interpolate", mask_act="sigmoid",
                 speaker_encoder="mhfa", sample_rate=16000, encoder_features=False):
        super().__init__(wavlm, encoder_dim, kernel_size, stride, bottleneck, hidden, skip,
                         mask_blocks, norm, mask_act, mix_blocks, mix_blocks_before_proj, upsample,
                         encoder_features)
        if speaker_encoder not in SPEAKER_ENCODERS:
            raise ValueError(f"unknown speaker_encoder {speaker_encoder!r}; choose one of "
                             f"{list(SPEAKER_ENCODERS)}")
        self.mhfa = self.ge2e = None
        if speaker_encoder == "mhfa":
            self.mhfa = MHFA(wavlm.num_layers + 1, wavlm.hidden_size, mhfa_compression, mhfa_heads, speaker_dim)
        else:
            self.ge2e = GE2EEncoder(sample_rate=sample_rate, freeze=True)
            speaker_dim = GE2E_DIM
        self.fusion = SpeakerFusion(encoder_dim, speaker_dim, fusion, speaker_transform)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ge2e is not None:  # frozen: always in inference mode
            self.ge2e.eval()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint whose single WavLM-rate block is named `mix_block` loads as `mix_blocks.0`
        old = prefix + "mix_block."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "mix_blocks.0." + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def speaker_embedding(self, enroll: torch.Tensor, enroll_lens=None) -> torch.Tensor:
        """``enroll [batch, time]`` -> speaker embedding ``[batch, speaker_dim]`` (MHFA or GE2E)."""
        if self.ge2e is not None:
            return self.ge2e(enroll, enroll_lens)
        hidden = self.wavlm(enroll, enroll_lens, segments=_real_sample_segments(enroll, enroll_lens))
        return self.mhfa(hidden, self.wavlm.frame_padding_mask(enroll, enroll_lens))

    def condition(self, mix, enroll, mix_lens, enroll_lens, w, frame_mask):
        # [layers + 1, batch, frames, dim]; statistics over each mixture's own samples
        hidden = self.wavlm(mix, mix_lens, segments=_real_sample_segments(mix, mix_lens))
        frames = self.wavlm.num_frames(_sample_lengths(mix, mix_lens))
        x = self.with_encoding(self.mix_features(hidden, frames, w.shape[-1]), w, frame_mask)
        return self.fusion(x, self.speaker_embedding(enroll, enroll_lens))


class WavLMDynamicTasNet(_WavLMExtractor):
    """Single-pass WavLM TSE model with hybrid mask, internal speaker and QKb (module docstring).

    Arguments
    ---------
    wavlm : modules.models.wavlm.WavLM
    num_hybrid_layers : int
        N, the layers run on ``[enroll | silence | mix]`` before the sequence switch (5).
    hybrid_mask : bool
        Block-diagonal attention in those layers (True), or full attention (False).
    qkb : str
        Key bias of layers N+1 .. L (:func:`qkb_key_bias`): ``hard`` (default, the design and
        the reference's first version: keys with ``s_t < tau`` suppressed; no gradient),
        ``soft`` (the author's later version: ``scale * cos(h_t, e)``, learnable ``scale``),
        ``soft_log`` (``scale * log s_t``) or ``none``.
    tau : float
        Hard threshold on ``s_t = sigmoid(cos(h_t, e))`` (0.5: keys with a negative cosine are
        suppressed).
    qkb_fallback_fraction : float
        Hard mode: a sample with every key suppressed keeps this fraction of its most
        target-like keys (at least one); 0 disables this (uniform attention, as the reference).
    soft_scale : float
        Initial value of the learnable (positive) scale of the soft biases (5, the later
        version's start for ``soft``).
    silence_seconds : float
        Silence between enrolment and mixture (1 s), at ``sample_rate``.
    sample_rate : int
        Rate of the waveforms (16000 for the released WavLM).
    encoder_dim, kernel_size, stride, bottleneck, hidden, skip, mask_blocks, norm, mask_act, upsample
        As :class:`WavLMTasNet`.
    encoder_features : bool
        As :class:`WavLMTasNet` (added to the mask head's input; no fusion here).
    mix_blocks, mix_blocks_before_proj
        As :class:`WavLMTasNet`, but 0 blocks by default (the design and the reference's
        first version: the projection goes straight to the mask head); the later version
        has 4 after the projection.
    """

    def __init__(self, wavlm: WavLM, num_hybrid_layers=5, hybrid_mask=True, qkb="hard", tau=0.5,
                 qkb_fallback_fraction=0.1, soft_scale=5.0, silence_seconds=1.0, sample_rate=16000,
                 encoder_dim=512, kernel_size=320, stride=160, bottleneck=256, hidden=512, skip=256,
                 mask_blocks=3, norm="gLN", mask_act="sigmoid", mix_blocks=0, mix_blocks_before_proj=False,
                 upsample="interpolate", encoder_features=False):
        super().__init__(wavlm, encoder_dim, kernel_size, stride, bottleneck, hidden, skip,
                         mask_blocks, norm, mask_act, mix_blocks, mix_blocks_before_proj, upsample,
                         encoder_features)
        if not 0 <= num_hybrid_layers <= wavlm.num_layers:
            raise ValueError(f"num_hybrid_layers={num_hybrid_layers} must be in 0 .. {wavlm.num_layers} "
                             "(the WavLM's layers)")
        if qkb not in QKB_MODES:
            raise ValueError(f"unknown qkb {qkb!r}; choose one of {list(QKB_MODES)}")
        self.num_hybrid_layers = int(num_hybrid_layers)
        self.hybrid_mask = bool(hybrid_mask)
        self.qkb = qkb
        self.tau = float(tau)
        self.qkb_fallback_fraction = float(qkb_fallback_fraction)
        self.silence_samples = int(round(silence_seconds * sample_rate))
        soft = qkb in ("soft", "soft_log")
        self.log_soft_scale = nn.Parameter(torch.tensor(math.log(soft_scale))) if soft else None
        self.last_fallbacks = 0  # samples x layers that used the hard-QKb fallback in the last call

    # ---------------------------------------------------------------- input assembly

    def layout(self, enroll_samples: torch.Tensor, mix_samples: torch.Tensor) -> SequenceLayout:
        cfg = self.wavlm.config
        return sequence_layout(enroll_samples, mix_samples, self.silence_samples, cfg.conv_kernel,
                               cfg.conv_stride)

    def assemble(self, mix, enroll, mix_lens=None, enroll_lens=None):
        """Build ``[enroll | zeros | silence | mix]`` per sample, right-padded.

        Returns ``(wav [batch, samples], sample_mask [batch, samples], layout)``."""
        layout = self.layout(_sample_lengths(enroll, enroll_lens), _sample_lengths(mix, mix_lens))
        total = int(layout.total_samples.max())
        wav = mix.new_zeros(mix.shape[0], total)
        t = torch.arange(total, device=mix.device)[None, :]
        n = min(enroll.shape[-1], total)
        wav[:, :n] = enroll[:, :n] * (t[:, :n] < layout.enroll_samples[:, None])
        # the mixture of sample b goes to [mix_start_sample[b], total_samples[b])
        source = t - layout.mix_start_sample[:, None]
        in_mix = (source >= 0) & (source < layout.mix_samples[:, None])
        gathered = torch.gather(mix, 1, source.clamp(0, mix.shape[-1] - 1).expand(mix.shape[0], -1))
        wav = torch.where(in_mix, gathered, wav)
        return wav, t < layout.total_samples[:, None], layout

    @staticmethod
    def split_concatenated(wav: torch.Tensor, enroll_samples, silence_samples: int, wav_lens=None):
        """Undo a user's ``[enroll | silence | mix]`` concatenation.

        ``enroll_samples`` is an int or ``[batch]`` tensor. Returns ``(mix, enroll, mix_lens,
        enroll_lens)`` with relative lengths."""
        batch, total = wav.shape
        enroll_n = torch.as_tensor(enroll_samples, device=wav.device).long().expand(batch)
        total_n = _sample_lengths(wav, wav_lens)
        mix_n = total_n - enroll_n - silence_samples
        if (mix_n <= 0).any():
            raise ValueError(f"the concatenated input has no mixture after {int(enroll_n.max())} "
                             f"enrolment samples and {silence_samples} of silence")
        t = torch.arange(total, device=wav.device)[None, :]
        source = (t[:, : int(mix_n.max())] + (enroll_n + silence_samples)[:, None]).clamp(max=total - 1)
        mix = torch.gather(wav, 1, source) * (t[:, : source.shape[1]] < mix_n[:, None])
        enroll = wav[:, : int(enroll_n.max())] * (t[:, : int(enroll_n.max())] < enroll_n[:, None])
        return mix, enroll, mix_n.float() / mix.shape[1], enroll_n.float() / enroll.shape[1]

    # ---------------------------------------------------------------- WavLM pass

    @property
    def soft_scale(self):
        return self.log_soft_scale.exp() if self.log_soft_scale is not None else None

    def mix_hidden_states(self, mix, enroll, mix_lens=None, enroll_lens=None) -> dict:
        """The WavLM part. Returns a dict with

        * ``hidden``: list of ``num_layers + 1`` tensors ``[batch, mix frames, dim]`` (the mixture
          frames of the transformer input and of every layer's output);
        * ``padding_mask``: ``[batch, mix frames]`` True on real mixture frames;
        * ``speaker``: ``[batch, dim]`` mean of the enrolment frames after layer N;
        * ``scores``: list of ``[batch, mix frames]`` QKb scores ``s_t`` per layer after N;
        * ``position_bias``: the relative position bias used after the switch;
        * ``layout``: the :class:`SequenceLayout`.
        """
        wavlm, n_hybrid = self.wavlm, self.num_hybrid_layers
        wav, sample_mask, layout = self.assemble(mix, enroll, mix_lens, enroll_lens)
        # statistics per segment: nothing before the first layer mixes enrolment and mixture
        hidden, padding = wavlm.embed(wav, attention_mask=sample_mask,
                                      segments=layout.sample_segments(wav.shape[-1]))
        frames = hidden.shape[1]
        bias = None
        if self.hybrid_mask and n_hybrid > 0:
            # built with float16's mask value: finite in any dtype it is later cast to
            bias = segment_attention_bias(layout.segment_ids(frames), torch.float16).to(hidden.dtype)
        first, _ = wavlm.run_layers(hidden, 0, n_hybrid, attn_bias=bias, padding_mask=padding)
        states = [hidden] + first
        # internalised speaker: mean of the enrolment frames after layer N
        t = torch.arange(frames, device=hidden.device)[None, :]
        speaker = mean_pooling(states[-1], t < layout.enroll_frames[:, None])
        # sequence switch: each sample's mixture frames, left-aligned
        mix_frames = int(layout.mix_frames.max())
        m = torch.arange(mix_frames, device=hidden.device)[None, :]
        index = (layout.mix_start_frame[:, None] + m).clamp(max=frames - 1)
        index = index[..., None].expand(-1, -1, hidden.shape[-1])
        mix_mask = m < layout.mix_frames[:, None]
        states = [torch.gather(s, 1, index) * mix_mask[..., None].to(s.dtype) for s in states]

        scores, fallbacks = [], []

        def key_bias(layer_index, h):
            s = qkb_scores(h, speaker)
            scores.append(s)
            b, fb = qkb_key_bias(s, self.qkb, self.tau, mix_mask, self.soft_scale,
                                 self.qkb_fallback_fraction, h.dtype)
            if fb is not None:
                fallbacks.append(fb)
            return b

        # positions 0 .. mix frames - 1: the relative position bias of the mixture-only sequence
        rest, position_bias = wavlm.run_layers(
            states[-1], n_hybrid, wavlm.num_layers, attn_bias=None if self.qkb == "none" else key_bias,
            padding_mask=mix_mask, positions=torch.arange(mix_frames, device=hidden.device))
        self.last_fallbacks = int(sum(int(fb.sum()) for fb in fallbacks))
        return {"hidden": states + rest, "padding_mask": mix_mask, "speaker": speaker,
                "scores": scores, "position_bias": position_bias, "layout": layout}

    def condition(self, mix, enroll, mix_lens, enroll_lens, w, frame_mask):
        out = self.mix_hidden_states(mix, enroll, mix_lens, enroll_lens)
        return self.with_encoding(self.mix_features(out["hidden"], out["layout"].mix_frames, w.shape[-1]),
                                  w, frame_mask)

    def forward(self, mix: torch.Tensor, enroll: torch.Tensor | None = None, mix_lens=None,
                enroll_lens=None, enroll_samples=None):
        """Two waveforms ``(mix, enroll)``, or one concatenated ``[enroll | silence | mix]``
        waveform as ``mix`` with ``enroll=None`` and ``enroll_samples`` (int or ``[batch]``; the
        silence must be ``silence_seconds`` long; ``mix_lens`` then are the concatenation's
        relative lengths). Returns the target estimate ``[batch, mixture time]``."""
        if enroll is None:
            if enroll_samples is None:
                raise ValueError("give `enroll`, or a concatenated [enroll | silence | mix] input "
                                 "with `enroll_samples`")
            if mix.dim() == 1:
                mix = mix.unsqueeze(0)
            mix, enroll, mix_lens, enroll_lens = self.split_concatenated(
                mix, enroll_samples, self.silence_samples, mix_lens)
        return super().forward(mix, enroll, mix_lens, enroll_lens)
