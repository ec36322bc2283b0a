"""Conv-TasNet: a learned filterbank and a temporal convolutional network (TCN) mask estimator.

Reference: Y. Luo and N. Mesgarani, "Conv-TasNet: Surpassing Ideal Time-Frequency Magnitude
Masking for Speech Separation", IEEE/ACM TASLP 27(8), 2019 (arXiv:1809.07454). Names follow the
paper: N encoder filters, L filter length (samples), B bottleneck channels, H channels inside a
block, Sc skip-connection channels, P kernel size, X blocks per repeat, R repeats.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.models.base import Decoder, Encoder, EncoderMaskerDecoder, make_norm, mask_activation

__all__ = ["TemporalBlock", "TCN", "ConvTasNet", "receptive_field"]

def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` applied to ``[batch, frames, C_in]``: one matrix product over all frames."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


class TemporalBlock(nn.Module):
    """One 1-D convolutional block of the TCN (paper Fig. 1C).

    1x1 conv B->H, PReLU, norm, depthwise conv (kernel P, dilation d), PReLU, norm, then a 1x1
    conv back to B for the residual path and a 1x1 conv to Sc for the skip path.
    ``[batch, B, frames]`` -> (residual ``[batch, B, frames]`` or None, skip ``[batch, Sc, frames]``).

    Inside, activations are ``[batch, frames, channels]`` (:meth:`forward_channels_last`, which
    :class:`TCN` calls directly): the 1x1 convolutions are then single matrix products and the
    depthwise convolution runs on a channels-last view, both much faster on CPU than the
    channels-first convolutions. The parameters are those of the convolutions.
    """

    def __init__(self, B, H, Sc, P, dilation, norm="gLN", causal=False, residual=True):
        super().__init__()
        self.causal = causal
        self.dilation = dilation
        self.pad = (P - 1) * dilation
        self.conv_in = nn.Conv1d(B, H, 1)
        self.act1 = nn.PReLU()
        self.norm1 = make_norm(norm, H, channels_last=True)
        self.dconv = nn.Conv1d(H, H, P, dilation=dilation, groups=H)
        self.act2 = nn.PReLU()
        self.norm2 = make_norm(norm, H, channels_last=True)
        self.res_conv = nn.Conv1d(H, B, 1) if residual else None
        self.skip_conv = nn.Conv1d(H, Sc, 1)

    def depthwise(self, y: torch.Tensor) -> torch.Tensor:
        """The padded depthwise convolution of ``[batch, frames, H]``, same layout out."""
        if self.causal:
            y = F.pad(y, (0, 0, self.pad, 0))
            pad = 0
        elif self.pad % 2:
            y = F.pad(y, (0, 0, self.pad // 2, self.pad - self.pad // 2))
            pad = 0
        else:
            pad = self.pad // 2
        # [batch, frames, H] seen as a channels-last [batch, H, 1, frames] image
        y = F.conv2d(y.transpose(1, 2).unsqueeze(2), self.dconv.weight.unsqueeze(2),
                     self.dconv.bias, padding=(0, pad), dilation=(1, self.dilation),
                     groups=self.dconv.groups)
        return y.squeeze(2).transpose(1, 2)

    def forward_channels_last(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``[batch, frames, B]`` -> (residual ``[batch, frames, B]`` or None, skip
        ``[batch, frames, Sc]``)."""
        y = self.norm1(self.act1(_pointwise(self.conv_in, x)))
        y = self.norm2(self.act2(self.depthwise(y)))
        res = x + _pointwise(self.res_conv, y) if self.res_conv is not None else None
        return res, _pointwise(self.skip_conv, y)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        res, skip = self.forward_channels_last(x.transpose(1, 2))
        return (res.transpose(1, 2) if res is not None else None), skip.transpose(1, 2)


class TCN(nn.Module):
    """Temporal convolutional network mask estimator of Conv-TasNet (paper Fig. 1B).

    norm -> 1x1 conv N->B -> R repeats of X blocks with dilations 1, 2, ..., 2^(X-1) (residual
    and skip paths) -> sum of skips -> PReLU -> 1x1 conv Sc -> n_src*N -> mask activation.

    Input ``[batch, N, frames]``; output masks ``[batch, n_src, N, frames]``. The residual
    convolution of the very last block is omitted: its output is never used. Activations are
    ``[batch, frames, channels]`` inside (see :class:`TemporalBlock`).
    """

    def __init__(self, N, B=128, H=512, Sc=128, P=3, X=8, R=3, n_src=2, norm="gLN",
                 causal=False, mask_act="relu"):
        super().__init__()
        if causal and norm == "gLN":
            raise ValueError("gLN looks at the whole utterance; use norm='cLN' with causal=True")
        self.n_src, self.N = n_src, N
        self.P, self.X, self.R = P, X, R
        self.in_norm = make_norm(norm, N, channels_last=True)
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
        x = _pointwise(self.bottleneck, self.in_norm(w.transpose(1, 2)))
        skip_sum = torch.zeros(0)
        for i, block in enumerate(self.blocks):
            res, skip = block.forward_channels_last(x)
            skip_sum = skip if i == 0 else skip_sum + skip
            if res is not None:
                x = res
        m = _pointwise(self.mask_conv, self.out_act(skip_sum))  # [batch, frames, n_src * N]
        m = m.view(w.shape[0], w.shape[-1], self.n_src, self.N).permute(0, 2, 3, 1)
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
