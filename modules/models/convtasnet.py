"""Conv-TasNet: a learned filterbank and a temporal convolutional network (TCN) mask estimator.

Reference: Y. Luo and N. Mesgarani, "Conv-TasNet: Surpassing Ideal Time-Frequency Magnitude
Masking for Speech Separation", IEEE/ACM TASLP 27(8), 2019 (arXiv:1809.07454). Names follow the
paper: N encoder filters, L filter length (samples), B bottleneck channels, H channels inside a
block, Sc skip-connection channels, P kernel size, X blocks per repeat, R repeats.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.models.base import Decoder, Encoder, EncoderMaskerDecoder, make_norm, mask_activation

__all__ = ["TemporalBlock", "TCN", "ConvTasNet", "receptive_field"]


def _pointwise(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution (Conv1d ``weight [C_out, C_in, 1]``) applied to ``[batch, frames, C_in]``:
    one matrix product over all frames."""
    return F.linear(x, weight.squeeze(-1), bias)


def _depthwise(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               dilation: int) -> torch.Tensor:
    """Depthwise convolution (no padding) of ``[batch, frames, H]`` with a Conv1d weight
    ``[H, 1, P]``, seen as a channels-last ``[batch, H, 1, frames]`` image; same layout out.
    Under ``torch.export`` (ONNX), a channels-first Conv1d: the same sums, and a graph whose
    length stays dynamic."""
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():
            return F.conv1d(xp.transpose(1, 2), weight, bias, dilation=dilation,
                            groups=weight.shape[0]).transpose(1, 2)
    y = F.conv2d(xp.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), bias,
                 dilation=(1, dilation), groups=weight.shape[0])
    return y.squeeze(2).transpose(1, 2)


class _DepthwiseFunction(torch.autograd.Function):
    """:func:`_depthwise` with its gradients written out: the input gradient is the same
    channels-last convolution of the zero-padded output gradient with the flipped kernel, the
    weight gradient P products summed over batch and frames. oneDNN's own backward of the
    channels-last depthwise convolution is many times slower than its forward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, xp, weight, bias, dilation):
        ctx.save_for_backward(xp, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return _depthwise(xp, weight, bias, dilation)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        xp, weight = ctx.saved_tensors
        d, taps, frames = ctx.dilation, weight.shape[-1], grad.shape[1]
        span = (taps - 1) * d
        grad_xp = _depthwise(F.pad(grad, (0, 0, span, span)), weight.flip(-1), None, d)
        grad_w = torch.stack([(grad * xp[:, k * d:k * d + frames]).sum((0, 1))
                              for k in range(taps)], -1).unsqueeze(1)
        grad_b = grad.sum((0, 1)) if ctx.has_bias else None
        return grad_xp, grad_w.to(weight.dtype), grad_b, None


class _PReLUFunction(torch.autograd.Function):
    """Single-slope PReLU with its gradients as plain element-wise products (the built-in
    backward's reduction for the slope is slow on CPU)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, slope):
        ctx.save_for_backward(x, slope)
        return F.prelu(x, slope)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, slope = ctx.saved_tensors
        negative = x.clamp_max(0)
        grad_x = torch.where(x > 0, grad, grad * slope.to(grad.dtype))
        grad_slope = (grad * negative).sum().reshape(slope.shape).to(slope.dtype)
        return grad_x, grad_slope


@torch.jit.unused
def _depthwise_train(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     dilation: int) -> torch.Tensor:
    return _DepthwiseFunction.apply(xp, weight, bias, dilation)


@torch.jit.unused
def _prelu_train(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return _PReLUFunction.apply(x, slope)


def _prelu(x: torch.Tensor, slope: torch.Tensor, training: bool) -> torch.Tensor:
    """PReLU; in training with gradients, through :class:`_PReLUFunction`."""
    if not torch.jit.is_scripting() and training and torch.is_grad_enabled():
        return _prelu_train(x, slope)
    return F.prelu(x, slope)


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# (the signatures of the next two, which TorchScript must read though it never runs them, are
# type comments: it rejects their annotations written as strings)
@torch.jit.unused
def _fused_inference(x):
    # type: (Tensor) -> bool
    """True where :meth:`TCN.forward` runs on oneDNN's fused kernels: float32 on the CPU, no
    autograd, no autocast, not being exported."""
    return (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


# id(parameter) -> (its storage, its version, its matrix in oneDNN's blocked layout): packed
# again when the parameter changes (an optimizer step, load_state_dict), dropped with it
_PACKED: dict[int, tuple[int, int, torch.Tensor]] = {}


@torch.jit.unused
def _packed(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The Conv1d ``weight [C_out, C_in, 1]`` as oneDNN's prepacked matrix, made once per
    version of the weight (a product with the plain matrix reorders it on every call)."""
    key, stamp = id(weight), (weight.data_ptr(), weight._version)
    hit = _PACKED.get(key)
    if hit is None or hit[:2] != stamp:
        if hit is None:
            weakref.finalize(weight, _PACKED.pop, key, None)
        hit = (*stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach().squeeze(-1), rows))
        _PACKED[key] = hit
    return hit[2]


@torch.jit.unused
def _linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  slope: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_pointwise` in one oneDNN call with what follows it: a single-slope PReLU
    (``slope``; oneDNN's leaky ReLU) or the sum with ``add``."""
    w = _packed(weight, x.shape[0] * x.shape[1])
    if add is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, w, bias, "add")
    if slope is not None:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "leaky_relu", [float(slope)], "")
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


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
        # explicit zero padding: oneDNN's own padding is many times slower at large dilations
        if self.causal:
            y = F.pad(y, (0, 0, self.pad, 0))
        else:
            y = F.pad(y, (0, 0, self.pad // 2, self.pad - self.pad // 2))
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            return _depthwise_train(y, self.dconv.weight, self.dconv.bias, self.dilation)
        return _depthwise(y, self.dconv.weight, self.dconv.bias, self.dilation)

    def forward_channels_last(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``[batch, frames, B]`` -> (residual ``[batch, frames, B]`` or None, skip
        ``[batch, frames, Sc]``)."""
        y = _pointwise(x, self.conv_in.weight, self.conv_in.bias)
        y = self.norm1(_prelu(y, self.act1.weight, self.training))
        y = self.norm2(_prelu(self.depthwise(y), self.act2.weight, self.training))
        res: torch.Tensor | None = None
        if self.res_conv is not None:
            res = x + _pointwise(y, self.res_conv.weight, self.res_conv.bias)
        return res, _pointwise(y, self.skip_conv.weight, self.skip_conv.bias)

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor, skip_sum: torch.Tensor | None):
        """Inference of :meth:`forward_channels_last` on oneDNN's fused kernels (the first 1x1
        conv with its PReLU; the residual and skip 1x1 convs with their sums) ->
        (residual or None, ``skip_sum`` + skip)."""
        y = self.norm1(_linear_fused(x, self.conv_in.weight, self.conv_in.bias, slope=self.act1.weight))
        y = self.norm2(F.prelu(self.depthwise(y), self.act2.weight))
        res = (_linear_fused(y, self.res_conv.weight, self.res_conv.bias, add=x)
               if self.res_conv is not None else None)
        return res, _linear_fused(y, self.skip_conv.weight, self.skip_conv.bias, add=skip_sum)

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
        x = self.in_norm(w.transpose(1, 2))  # [batch, frames, N]
        if not torch.jit.is_scripting() and _fused_inference(x):
            skip_sum = self._skips_fused(x)
        else:
            x = _pointwise(x, self.bottleneck.weight, self.bottleneck.bias)
            skip_sum = torch.zeros(0)
            for i, block in enumerate(self.blocks):
                res, skip = block.forward_channels_last(x)
                skip_sum = skip if i == 0 else skip_sum + skip
                if res is not None:
                    x = res
        skip_sum = _prelu(skip_sum, self.out_act.weight, self.training)
        # [batch, frames, n_src * N]
        m = _pointwise(skip_sum, self.mask_conv.weight, self.mask_conv.bias)
        m = m.view(w.shape[0], w.shape[-1], self.n_src, self.N).permute(0, 2, 3, 1)
        return self.mask_act(m)

    @torch.jit.unused
    def _skips_fused(self, x):
        # type: (Tensor) -> Tensor
        """The sum of the blocks' skip outputs for the normalised input ``x [batch, frames, N]``,
        by :meth:`TemporalBlock.forward_fused` (inference)."""
        x = _linear_fused(x, self.bottleneck.weight, self.bottleneck.bias)
        skip_sum: torch.Tensor | None = None
        for block in self.blocks:
            res, skip_sum = block.forward_fused(x, skip_sum)
            if res is not None:
                x = res
        return skip_sum

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
