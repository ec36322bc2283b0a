"""TasNet family: the encoder -> masker -> decoder skeleton and Conv-TasNet.

Reference: Y. Luo and N. Mesgarani, "Conv-TasNet: Surpassing Ideal Time-Frequency Magnitude
Masking for Speech Separation", IEEE/ACM TASLP 27(8), 2019 (arXiv:1809.07454). Names follow the
paper: N encoder filters, L filter length (samples), B bottleneck channels, H channels inside a
block, Sc skip-connection channels, P kernel size, X blocks per repeat, R repeats.

Every separation model of the project is an :class:`EncoderMaskerDecoder`: an encoder turns the
waveform ``[batch, time]`` into a representation ``[batch, N, frames]``, a masker predicts one mask
per source ``[batch, n_src, N, frames]``, the masks multiply the representation and a decoder turns
each masked representation back into a waveform. The result is ``[batch, time, n_src]``, the
layout of SpeechBrain's separation recipes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Encoder",
    "Decoder",
    "EncoderMaskerDecoder",
    "GlobalLayerNorm",
    "CumulativeLayerNorm",
    "ChannelLayerNorm",
    "TemporalBlock",
    "TCN",
    "ConvTasNet",
    "receptive_field",
]


class Encoder(nn.Module):
    """Learned analysis filterbank: 1-D convolution (stride L/2) followed by ReLU.

    Arguments
    ---------
    kernel_size : int
        Filter length L in samples.
    out_channels : int
        Number of filters N.
    stride : int, optional
        Hop in samples; defaults to ``kernel_size // 2`` as in the paper.
    relu : bool
        Apply the ReLU of the paper (True) or keep a linear encoder.
    """

    def __init__(self, kernel_size: int, out_channels: int, stride: int | None = None, relu=True):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride or max(1, kernel_size // 2)
        self.conv = nn.Conv1d(1, out_channels, kernel_size, stride=self.stride, bias=False)
        self.relu = relu

    def padding_for(self, length: int) -> int:
        """Zeros appended to a signal before the convolution: one frame length, whatever the
        signal's length, so that every sample is covered by whole frames (the transposed
        convolution then gives back at least ``length`` samples). A fixed pad keeps the graph
        free of length-dependent branches, so TorchScript/ONNX exports take any length."""
        return self.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, time]`` -> ``[batch, N, frames]``."""
        w = self.conv(x.unsqueeze(1))
        return F.relu(w) if self.relu else w


class Decoder(nn.Module):
    """Learned synthesis filterbank: transposed 1-D convolution (overlap-add)."""

    def __init__(self, kernel_size: int, in_channels: int, stride: int | None = None):
        super().__init__()
        self.stride = stride or max(1, kernel_size // 2)
        self.deconv = nn.ConvTranspose1d(in_channels, 1, kernel_size, stride=self.stride, bias=False)

    def forward(self, w: torch.Tensor, length: int) -> torch.Tensor:
        """``[batch, N, frames]`` -> ``[batch, length]``."""
        # the encoder's padding guarantees at least ``length`` output samples
        return self.deconv(w).squeeze(1)[..., :length]


class EncoderMaskerDecoder(nn.Module):
    """Shared skeleton: ``est = decoder(encoder(mix) * masker(encoder(mix)))``.

    Each step is a method that a model may override (``encode``, ``apply_masks``, ``decode``).
    The masker maps ``[batch, N, frames]`` to masks ``[batch, n_src, N, frames]`` and must expose
    ``n_src``. The encoder must provide ``padding_for(length)``; the decoder takes
    ``(representation, length)``.

    Arguments
    ---------
    encoder, masker, decoder : torch.nn.Module
    """

    def __init__(self, encoder: nn.Module, masker: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.masker = masker
        self.decoder = decoder

    @property
    def n_src(self) -> int:
        return self.masker.n_src

    def encode(self, mix: torch.Tensor) -> torch.Tensor:
        return self.encoder(F.pad(mix, (0, self.encoder.padding_for(mix.shape[-1]))))

    def apply_masks(self, w: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return w.unsqueeze(1) * masks

    def decode(self, masked: torch.Tensor, length: int) -> torch.Tensor:
        """``[batch, n_src, N, frames]`` -> ``[batch, length, n_src]``."""
        b, s = masked.shape[0], masked.shape[1]
        est = self.decoder(masked.flatten(0, 1), length)
        return est.reshape(b, s, length).transpose(1, 2)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separate ``mix [batch, time]`` into ``[batch, time, n_src]``."""
        if mix.dim() == 1:
            mix = mix.unsqueeze(0)
        if mix.dim() != 2:
            raise ValueError(f"expected a mixture of shape [batch, time], got {mix.shape}")
        w = self.encode(mix)
        masks = self.masker(w)
        return self.decode(self.apply_masks(w, masks), mix.shape[-1])


class _AffineNorm(nn.Module):
    """Per-channel gain ``gamma`` and bias ``beta`` of shape ``[1, C, 1]`` (paper's norms)."""

    def __init__(self, channels: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))


class GlobalLayerNorm(_AffineNorm):
    """gLN: normalise ``[batch, C, frames]`` over channels *and* frames (paper eq. 13)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics per channel over frames, then pooled over channels: as fast as one
        # var_mean over both dims in PyTorch, and exact in ONNX Runtime, whose single long
        # reduction loses ~1e-3 over a minute of frames
        var_c, mean_c = torch.var_mean(x, dim=2, correction=0, keepdim=True)
        mean = mean_c.mean(1, keepdim=True)
        var = (var_c + (mean_c - mean).square()).mean(1, keepdim=True)
        # gamma * (x - mean) / std + beta, folded into one scale and one shift per channel
        scale = self.gamma * torch.rsqrt(var + self.eps)
        return torch.addcmul(self.beta - mean * scale, x, scale)


class CumulativeLayerNorm(_AffineNorm):
    """cLN: causal normalisation; frame k uses the statistics of channels and frames 0..k
    (paper eq. 14-16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, t = x.shape[1], x.shape[2]
        count = c * torch.arange(1, t + 1, device=x.device, dtype=x.dtype).view(1, 1, t)
        cum_sum = x.sum(1, keepdim=True).cumsum(-1)
        cum_pow = x.pow(2).sum(1, keepdim=True).cumsum(-1)
        mean = cum_sum / count
        var = (cum_pow / count - mean.pow(2)).clamp_min(0)
        return self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta


class ChannelLayerNorm(nn.Module):
    """Channel-wise layer norm: each frame normalised over its channels (causal as well)."""

    def __init__(self, channels: int, eps: float = 1e-8):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


_NORMS = {"gLN": GlobalLayerNorm, "cLN": CumulativeLayerNorm, "chLN": ChannelLayerNorm}


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind not in _NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {sorted(_NORMS)}")
    return _NORMS[kind](channels)


class TemporalBlock(nn.Module):
    """One 1-D convolutional block of the TCN (paper Fig. 1C).

    1x1 conv B->H, PReLU, norm, depthwise conv (kernel P, dilation d), PReLU, norm, then a 1x1
    conv back to B for the residual path and a 1x1 conv to Sc for the skip path.
    ``[batch, B, frames]`` -> (residual ``[batch, B, frames]`` or None, skip ``[batch, Sc, frames]``).
    """

    def __init__(self, B, H, Sc, P, dilation, norm="gLN", causal=False, residual=True):
        super().__init__()
        self.causal = causal
        self.pad = (P - 1) * dilation
        self.conv_in = nn.Conv1d(B, H, 1)
        self.act1 = nn.PReLU()
        self.norm1 = make_norm(norm, H)
        self.dconv = nn.Conv1d(H, H, P, dilation=dilation, groups=H)
        self.act2 = nn.PReLU()
        self.norm2 = make_norm(norm, H)
        self.res_conv = nn.Conv1d(H, B, 1) if residual else None
        self.skip_conv = nn.Conv1d(H, Sc, 1)

    def forward(self, x):
        y = self.norm1(self.act1(self.conv_in(x)))
        if self.causal:
            y = F.pad(y, (self.pad, 0))
        else:
            y = F.pad(y, (self.pad // 2, self.pad - self.pad // 2))
        y = self.norm2(self.act2(self.dconv(y)))
        res = x + self.res_conv(y) if self.res_conv is not None else None
        return res, self.skip_conv(y)


_MASK_ACTS = {
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "softmax": lambda m: torch.softmax(m, dim=1),  # over sources
    "linear": lambda m: m,
}


def mask_activation(name: str):
    if name not in _MASK_ACTS:
        raise ValueError(f"unknown mask activation {name!r}; choose one of {sorted(_MASK_ACTS)}")
    return _MASK_ACTS[name]


class TCN(nn.Module):
    """Temporal convolutional network mask estimator of Conv-TasNet (paper Fig. 1B).

    norm -> 1x1 conv N->B -> R repeats of X blocks with dilations 1, 2, ..., 2^(X-1) (residual
    and skip paths) -> sum of skips -> PReLU -> 1x1 conv Sc -> n_src*N -> mask activation.

    Input ``[batch, N, frames]``; output masks ``[batch, n_src, N, frames]``. The residual
    convolution of the very last block is omitted: its output is never used.
    """

    def __init__(self, N, B=128, H=512, Sc=128, P=3, X=8, R=3, n_src=2, norm="gLN",
                 causal=False, mask_act="relu"):
        super().__init__()
        if causal and norm == "gLN":
            raise ValueError("gLN looks at the whole utterance; use norm='cLN' with causal=True")
        self.n_src, self.N = n_src, N
        self.P, self.X, self.R = P, X, R
        self.in_norm = make_norm(norm, N)
        self.bottleneck = nn.Conv1d(N, B, 1)
        n_blocks = X * R
        self.blocks = nn.ModuleList(
            TemporalBlock(B, H, Sc, P, 2**x, norm=norm, causal=causal,
                          residual=(r * X + x) < n_blocks - 1)
            for r in range(R) for x in range(X)
        )
        self.out_act = nn.PReLU()
        self.mask_conv = nn.Conv1d(Sc, n_src * N, 1)
        self.mask_act_name = mask_act
        self.mask_act = mask_activation(mask_act)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.bottleneck(self.in_norm(w))
        skip_sum = 0.0
        for block in self.blocks:
            res, skip = block(x)
            skip_sum = skip_sum + skip
            if res is not None:
                x = res
        m = self.mask_conv(self.out_act(skip_sum))
        m = m.view(w.shape[0], self.n_src, self.N, w.shape[-1])
        return self.mask_act(m)

    def receptive_field_frames(self) -> int:
        """Frames of encoder output that influence one output frame."""
        return 1 + self.R * sum((self.P - 1) * 2**x for x in range(self.X))


def receptive_field(model: EncoderMaskerDecoder) -> int:
    """Input samples that can influence one output sample of a TasNet.

    An output sample lies in ``ceil(L / stride)`` decoder frames; each frame sees
    ``receptive_field_frames()`` encoder frames of the TCN; each encoder frame spans L samples.
    """
    stride, kernel = model.encoder.stride, model.encoder.kernel_size
    frames = model.masker.receptive_field_frames() + -(-kernel // stride) - 1
    return (frames - 1) * stride + kernel


class ConvTasNet(EncoderMaskerDecoder):
    """Conv-TasNet: :class:`Encoder` -> :class:`TCN` masks -> :class:`Decoder`.

    Input ``[batch, time]``; output ``[batch, time, n_src]``.
    """

    def __init__(self, N=512, L=16, B=128, H=512, Sc=128, P=3, X=8, R=3, n_src=2,
                 norm="gLN", causal=False, mask_act="relu"):
        super().__init__(
            Encoder(L, N),
            TCN(N, B, H, Sc, P, X, R, n_src=n_src, norm=norm, causal=causal, mask_act=mask_act),
            Decoder(L, N),
        )
