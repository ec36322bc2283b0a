"""The encoder -> masker -> decoder skeleton shared by every separation and extraction model.

An encoder turns the waveform ``[batch, time]`` into a representation ``[batch, N, frames]``, a
masker predicts one mask per source ``[batch, n_src, N, frames]``, the masks multiply the
representation and a decoder turns each masked representation back into a waveform. The result
is ``[batch, time, n_src]``, the layout of SpeechBrain's separation recipes. Also here: the
normalisations (gLN, cLN, channel LN) and mask activations of Conv-TasNet (Luo and Mesgarani,
IEEE/ACM TASLP 2019), which other models reuse.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.models.losses import pit_si_snr_loss

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
    The model owns its training objective: ``model(mix, sources)`` returns the loss per mixture
    (:meth:`training_loss`, by default the negative SI-SNR with utterance-level PIT), so a recipe
    trains any model the same way, and a model with another objective (deep clustering)
    overrides :meth:`training_loss`.
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

    def separate(self, mix: torch.Tensor) -> torch.Tensor:
        """``mix [batch, time]`` -> ``[batch, time, n_src]``."""
        w = self.encode(mix)
        masks = self.masker(w)
        return self.decode(self.apply_masks(w, masks), mix.shape[-1])

    @torch.jit.unused  # training only: TorchScript exports keep the separation path
    def training_loss(self, mix, sources):
        """Loss per mixture ``[batch]`` for ``mix [batch, time]`` and ``sources [batch, time,
        n_src]``: the negative PIT SI-SNR of the separation."""
        return pit_si_snr_loss(self.separate(mix).float(), sources.float())

    def forward(self, mix: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
        """Separate ``mix [batch, time]`` into ``[batch, time, n_src]``; given the reference
        ``sources``, return the training loss per mixture instead (through ``forward``, so that
        DDP synchronises the gradients)."""
        if mix.dim() == 1:
            mix = mix.unsqueeze(0)
        if mix.dim() != 2:
            raise ValueError(f"expected a mixture of shape [batch, time], got {mix.shape}")
        if sources is not None:
            return self.training_loss(mix, sources)
        return self.separate(mix)


class _AffineNorm(nn.Module):
    """Per-channel gain ``gamma`` and bias ``beta`` of shape ``[1, C, 1]`` (paper's norms)."""

    def __init__(self, channels: int, eps: float = 1e-8, channels_last: bool = False):
        super().__init__()
        self.eps = eps
        self.channels_last = channels_last
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def affine(self):
        """``gamma, beta`` shaped to broadcast over the input's layout."""
        if self.channels_last:
            return self.gamma.view(1, 1, -1), self.beta.view(1, 1, -1)
        return self.gamma, self.beta


class GlobalLayerNorm(_AffineNorm):
    """gLN: normalise ``[batch, C, frames]`` over channels *and* frames (paper eq. 13).
    With ``channels_last=True`` the input is ``[batch, frames, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_dim, c_dim = (1, 2) if self.channels_last else (2, 1)
        gamma, beta = self.affine()
        # means per channel over frames, then pooled over channels: exact in ONNX Runtime too,
        # whose single long reduction loses ~1e-3 over a minute of frames. Two passes (mean,
        # then the mean square of x - mean) are much faster than var_mean's one-pass update on
        # CPU and as accurate.
        mean = x.mean(t_dim, keepdim=True).mean(c_dim, keepdim=True)
        centred = x - mean
        var = centred.square().mean(t_dim, keepdim=True).mean(c_dim, keepdim=True)
        return torch.addcmul(beta, centred, gamma * torch.rsqrt(var + self.eps))


class CumulativeLayerNorm(_AffineNorm):
    """cLN: causal normalisation; frame k uses the statistics of channels and frames 0..k
    (paper eq. 14-16). With ``channels_last=True`` the input is ``[batch, frames, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_dim, c_dim = (1, 2) if self.channels_last else (2, 1)
        gamma, beta = self.affine()
        c, t = x.shape[c_dim], x.shape[t_dim]
        shape = [1, 1, 1]
        shape[t_dim] = t
        count = c * torch.arange(1, t + 1, device=x.device, dtype=x.dtype).view(shape)
        cum_sum = x.sum(c_dim, keepdim=True).cumsum(t_dim)
        cum_pow = x.pow(2).sum(c_dim, keepdim=True).cumsum(t_dim)
        mean = cum_sum / count
        var = (cum_pow / count - mean.pow(2)).clamp_min(0)
        return gamma * (x - mean) / torch.sqrt(var + self.eps) + beta


class ChannelLayerNorm(nn.Module):
    """Channel-wise layer norm: each frame normalised over its channels (causal as well).
    With ``channels_last=True`` the input is ``[batch, frames, C]``."""

    def __init__(self, channels: int, eps: float = 1e-8, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return self.norm(x)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


_NORMS = {"gLN": GlobalLayerNorm, "cLN": CumulativeLayerNorm, "chLN": ChannelLayerNorm}


def make_norm(kind: str, channels: int, channels_last: bool = False) -> nn.Module:
    """A norm by name for ``[batch, channels, frames]`` (``[batch, frames, channels]`` with
    ``channels_last``)."""
    if kind not in _NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {sorted(_NORMS)}")
    return _NORMS[kind](channels, channels_last=channels_last)


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
