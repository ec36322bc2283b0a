"""MossFormer2: time-domain speech separation with gated attention and an FSMN memory.

Reference: S. Zhao, Y. Ma, C. Ni, C. Zhang, H. Wang, T. H. Nguyen, K. Zhou, J. Yip, D. Ng and
B. Ma, "MossFormer2: Combining Transformer and RNN-Free Recurrent Network for Enhanced
Time-Domain Monaural Speech Separation", ICASSP 2024 (arXiv:2312.11825).

Structure (paper Fig. 1; every tensor inside the mask net is ``[batch, frames, channels]``):

* encoder: 1-D conv, N filters of L=16 samples, stride 8, ReLU -> ``[batch, N, frames]``;
* mask net: global layer norm, linear N->N, scaled sinusoidal position embedding, R MossFormer2
  layers, layer norm, global layer norm, residual from before the layers, PReLU, linear to
  ``n_src * N``, then per source ``tanh(linear) * sigmoid(linear)``, linear, ReLU
  -> masks ``[batch, n_src, N, frames]``;
* one MossFormer2 layer = :class:`FLASH_ShareA_FFConvM` (single-head gated attention with a
  shared query/key projection: quadratic attention inside groups of 256 frames plus linear
  attention over the whole sequence, rotary position embedding, convolution-augmented
  feed-forward projections) followed by :class:`GatedFSMNBlock` (gated, dilated FSMN memory);
* decoder: transposed 1-D conv (kernel 16, stride 8).

The model is an :class:`~modules.models.base.EncoderMaskerDecoder`: ``[batch, time]`` in,
``[batch, time, n_src]`` out. Configurations of the paper: MossFormer2 (N=512, 24 layers,
55.7 M parameters) and MossFormer2-S (N=384, 25 layers, 37.8 M).

Weights of the released ClearerVoice model ``MossFormer2_SS_16K`` (PyPI package ``clearvoice``,
``clearvoice/models/mossformer2_ss/``) load with
:func:`modules.convert.clearvoice.load_clearvoice_checkpoint`, and the model then gives the same
output as that code (tests/test_mossformer2.py checks it). Facts taken from
that package are cited below by file name. Two of its habits are kept on purpose, for equality:
the input is not padded to whole frames (the last ``(time - 16) % 8`` samples are not encoded and
come out as zeros), and the attention logits are divided by the group size, not ``sqrt(d)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from modules.models.base import Decoder, Encoder, EncoderMaskerDecoder

__all__ = [
    "MossFormer2",
    "MossFormer2MaskNet",
    "MossFormer2Layer",
    "FLASH_ShareA_FFConvM",
    "GatedFSMNBlock",
    "GatedFSMN",
    "DilatedFSMN",
    "FFConvM",
    "ScaleNorm",
    "GlobalNorm",
    "ScaledSinuEmbedding",
    "RotaryEmbedding",
    "CONFIGS",
]

# Named configurations. "tiny" keeps the attention/FSMN widths that the ClearerVoice code fixes
# (query/key 128, FSMN 256, groups of 256 frames) so that its outputs can be compared with it.
CONFIGS = {
    "mossformer2": dict(N=512, num_layers=24),
    "mossformer2-s": dict(N=384, num_layers=25),
    "tiny": dict(N=64, num_layers=2),
}


# --------------------------------------------------------------------------------------------
# Normalisations and position embeddings
# --------------------------------------------------------------------------------------------


class ScaleNorm(nn.Module):
    """``g * x / max(||x||_2 / sqrt(dim), eps)`` over the last dimension, one learned gain ``g``
    (Nguyen & Salazar 2019; eps 1e-5 as in clearvoice ``mossformer2_block.py``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale
        return x * (self.g / rms.clamp(min=self.eps))  # one pass over x, not two


class GlobalNorm(nn.Module):
    """Normalise each example over *all* its frames and channels, then a per-channel gain and
    bias. Input ``[batch, frames, channels]``. The same statistics as ``nn.GroupNorm(1, C)``
    (which the ClearerVoice code uses on ``[batch, C, frames]``), for channel-last tensors."""

    def __init__(self, channels: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # group_norm with one group and no affine normalises over every non-batch element
        return torch.addcmul(self.bias, F.group_norm(x, 1, eps=self.eps), self.weight)


class ScaledSinuEmbedding(nn.Module):
    """Absolute sinusoidal position embedding ``scale * [sin(t w_i), cos(t w_i)]`` with
    ``w_i = 10000^(-2i/dim)`` and one learned ``scale``; returns ``[frames, dim]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, frames: int) -> torch.Tensor:
        t = torch.arange(frames, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        angles = torch.outer(t, self.inv_freq)
        return torch.cat((angles.sin(), angles.cos()), dim=-1) * self.scale


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) of the first ``dim`` features.

    Feature pairs ``(2i, 2i+1)`` of frame ``t`` are rotated by the angle ``t * theta^(-2i/dim)``.
    The ClearerVoice model uses ``rotary_embedding_torch.RotaryEmbedding(dim=32)`` (theta 10000,
    interleaved pairs, features beyond 32 left as they are), shared by all layers; here the
    cosines and sines are computed once per forward pass and handed to every layer.
    """

    def __init__(self, dim: int = 32, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        self.dim = dim
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` ``[frames, 1, dim]`` (float32), each angle written twice (once per
        feature of its pair) and the sine negative on the even features, so that a rotation is
        ``x * cos + swap_pairs(x) * sin``."""
        t = torch.arange(frames, device=self.freqs.device, dtype=torch.float32)
        angles = torch.outer(t, self.freqs).repeat_interleave(2, dim=-1).unsqueeze(1)
        sign = torch.tensor([-1.0, 1.0], device=self.freqs.device).repeat(self.dim // 2)
        return angles.cos(), angles.sin() * sign

    @staticmethod
    def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``cos.shape[-1]`` features of ``x [batch, frames, heads, d]`` in
        place (pair ``(2i, 2i+1)``: ``(a, b) -> (a cos - b sin, b cos + a sin)``); returns ``x``.
        ``x`` must be a fresh tensor that autograd does not need."""
        d = cos.shape[-1]
        part = x[..., :d]
        swapped = part.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        part.copy_(part * cos.to(x.dtype) + swapped * sin.to(x.dtype))
        return x


# --------------------------------------------------------------------------------------------
# Attention: FLASH_ShareA_FFConvM
# --------------------------------------------------------------------------------------------


def _depthwise_image(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise "same" convolution along frames: ``x [batch, frames, C]``, ``weight [C, k]``
    (odd ``k``) -> ``[batch, C, 1, frames]``, channels-last. A 2-D convolution on the
    ``[batch, C, 1, frames]`` view of ``x``, whose strides are channels-last: oneDNN's fast
    depthwise kernel, and no copies."""
    k = weight.shape[-1]
    return F.conv2d(x.unsqueeze(1).permute(0, 3, 1, 2), weight.view(-1, 1, 1, k),
                    padding=(0, (k - 1) // 2), groups=weight.shape[0])


def _frames(image: torch.Tensor) -> torch.Tensor:
    """``[batch, C, 1, frames]`` -> the ``[batch, frames, C]`` view."""
    return image.permute(0, 2, 3, 1).squeeze(1)


def _depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """``sum over batch and frames t of grad[b, t, c] * x_padded[b, t + j, c]`` -> ``[C, k]``.

    oneDNN's weight gradient for channels-last depthwise convolutions is ~15x slower than its
    forward pass. This computes it as a forward depthwise convolution instead: the frames are
    cut into chunks of ``chunk``, every (batch, chunk, channel) becomes one channel whose input
    is its ``chunk + k - 1`` frames of ``x`` and whose kernel is its ``chunk`` frames of ``grad``;
    the ``k`` outputs of each are summed over batch and chunks.
    """
    b, frames, c = x.shape
    half = (k - 1) // 2
    extra = -frames % chunk
    n = (frames + extra) // chunk
    windows = F.pad(x, (0, 0, half, half + extra)).unfold(1, chunk + k - 1, chunk)  # [b, n, c, w]
    image = windows.permute(3, 0, 1, 2).reshape(1, 1, chunk + k - 1, b * n * c).permute(0, 3, 1, 2)
    kernels = F.pad(grad, (0, 0, 0, extra)).reshape(b, n, chunk, c).transpose(2, 3)
    out = F.conv2d(image, kernels.reshape(b * n * c, 1, 1, chunk), groups=b * n * c)
    return out.reshape(b * n, c, k).sum(0)


class _DepthwiseConv(torch.autograd.Function):
    """:func:`_depthwise_image` with a fast backward pass: the input gradient is the forward
    convolution of ``grad`` with the flipped kernel, the weight gradient
    :func:`_depthwise_weight_grad`. (With oneDNN's own backward, one training step of the full
    model on 2 s of audio took 65 s, most of it in these weight gradients.)"""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _depthwise_image(x, weight)  # not a view: callers may change views of it in place

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = _frames(grad)
        grad_x = _frames(_depthwise_image(grad, weight.flip(-1))) if ctx.needs_input_grad[0] else None
        grad_w = (_depthwise_weight_grad(x, grad, weight.shape[-1])
                  if ctx.needs_input_grad[1] else None)
        return grad_x, grad_w


def conv_along_frames(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """Grouped, dilated convolution along the frames of a channel-last tensor, "same" padding.

    ``x [batch, frames, C_in]``, ``weight [C_out, C_in / C_out, k]`` (an ``nn.Conv1d`` weight
    with ``groups=C_out``, odd ``k``) -> ``[batch, frames, C_out]``, the same as ``conv1d`` on the
    transposed tensor. On CPU, oneDNN has fast kernels only for *undilated, depthwise*
    convolutions on *channels-last* tensors, and a slow weight gradient even for those; ``conv1d``
    as the reference uses it is 10-30x slower here (``python bench/mossformer2.py --kernels``).
    So everything becomes one undilated depthwise convolution (:class:`_DepthwiseConv`):

    * with dilation ``d``, frame ``t = d * s + r`` becomes frame ``s`` of channel ``(r, c)``: the
      ``[batch, frames / d, d * C]`` view of ``x`` (no copy), the kernel repeated ``d`` times;
    * a group of ``m`` input channels becomes ``m`` depthwise channels summed afterwards.
    """
    c_out, per_group, k = weight.shape
    batch, frames, c_in = x.shape
    pad = -frames % dilation
    if pad:  # whole rows of d frames; the extra frames are zeros, as the conv's padding would be
        x = F.pad(x, (0, 0, 0, pad))
    kernel = weight.reshape(c_in, k)
    if dilation > 1:
        x = x.reshape(batch, -1, dilation * c_in)
        kernel = kernel.repeat(dilation, 1)
    if torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad):
        y = _DepthwiseConv.apply(x, kernel)
    else:
        y = _depthwise_image(x, kernel)
    y = _frames(y).reshape(batch, -1, c_in)[:, :frames]
    if per_group == 1:
        return y
    out = y[..., 0::per_group]  # summing strided slices is 8x faster than .sum over a last dim of 2
    for j in range(1, per_group):
        out = out + y[..., j::per_group]
    return out


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper random mask: on CPU, ``bernoulli_`` costs ~16 ns per
    element (0.13 s for one 2048-wide activation of 2 s of audio, ~5 s per training step of the
    full model). Here each element gets 16 random bits (one 64-bit draw per 4 elements) and is
    dropped when they fall below ``round(p * 2^16)``: the drop rate is ``p`` to within 1/65536,
    the kept elements are scaled by the exact ``1 / (1 - rate)``. Inference is unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        threshold = round(self.p * 65536)
        n = x.numel()
        # all 64 bits random (random_() would leave the sign bit 0)
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        drop = bits.view(torch.int16)[:n].view(x.shape) < threshold - 32768
        return (x * (65536 / (65536 - threshold))).masked_fill_(drop, 0.0)


class FFConvM(nn.Module):
    """Convolution-augmented feed-forward projection ``[batch, frames, dim_in] -> [..., dim_out]``:
    norm, linear, SiLU, then ``h + depthwise_conv(h)`` along frames (kernel 17, same padding,
    no bias), dropout (clearvoice ``mossformer2_block.py`` FFConvM and ``conv_module.py``
    ConvModule)."""

    def __init__(self, dim_in: int, dim_out: int, norm: str = "scale", kernel_size: int = 17,
                 dropout: float = 0.1):
        super().__init__()
        if norm not in ("scale", "layer"):
            raise ValueError(f"norm must be 'scale' or 'layer', got {norm!r}")
        self.norm = ScaleNorm(dim_in) if norm == "scale" else nn.LayerNorm(dim_in)
        self.linear = nn.Linear(dim_in, dim_out)
        self.dwconv = nn.Conv1d(dim_out, dim_out, kernel_size, padding=kernel_size // 2,
                                groups=dim_out, bias=False)
        self.dropout = FastDropout(dropout)
        identity = torch.zeros(kernel_size)
        identity[kernel_size // 2] = 1.0
        self.register_buffer("identity", identity, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(self.norm(x))
        h = F.silu(h, inplace=not torch.is_grad_enabled())  # no second 2048-wide tensor at inference
        # h + conv(h) is one conv whose kernel has 1 added at its centre tap
        return self.dropout(conv_along_frames(h, self.dwconv.weight + self.identity))


class OffsetScale(nn.Module):
    """Per-head affine map ``x * gamma[h] + beta[h]``: ``[..., d] -> [..., heads, d]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(heads, dim))
        self.beta = nn.Parameter(torch.zeros(heads, dim))
        nn.init.normal_(self.gamma, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, x.unsqueeze(-2), self.gamma)


class FLASH_ShareA_FFConvM(nn.Module):  # noqa: N801 - the name of the paper's code and checkpoints
    """Gated single-head attention with a shared query/key projection (FLASH, Hua et al. 2022,
    as modified by MossFormer2). ``[batch, frames, dim] -> [batch, frames, dim]``.

    * token shift: the first half of the channels is delayed by one frame;
    * ``to_hidden`` gives the value ``v`` and gate ``u`` (each ``expansion_factor * dim / 2``
      wide), ``to_qk`` one ``qk_dim`` projection from which four per-head affine maps make the
      quadratic and linear queries and keys, all four rotated by the rotary embedding;
    * attention ``A = relu(q k^T / group_size)^2`` inside non-overlapping groups of
      ``group_size`` frames (the last group zero-padded) plus linear attention
      ``q_lin (k_lin^T x) / frames`` over the whole sequence, applied to both ``v`` and ``u``;
    * ``out = (A u) * v * sigmoid((A v) * u)``, projected back by ``to_out``, plus the input.
    """

    def __init__(self, dim: int, group_size: int = 256, qk_dim: int = 128,
                 expansion_factor: float = 4.0, kernel_size: int = 17, dropout: float = 0.1,
                 shift_tokens: bool = True):
        super().__init__()
        hidden = int(dim * expansion_factor)
        if hidden % 2:
            raise ValueError(f"dim * expansion_factor must be even, got {hidden}")
        self.group_size = group_size
        self.shift_tokens = shift_tokens
        self.to_hidden = FFConvM(dim, hidden, "scale", kernel_size, dropout)
        self.to_qk = FFConvM(dim, qk_dim, "scale", kernel_size, dropout)
        self.qk_offset_scale = OffsetScale(qk_dim, heads=4)
        self.to_out = FFConvM(hidden // 2, dim, "scale", kernel_size, dropout)
        self.attn_dropout = FastDropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        residual = x
        if self.shift_tokens:
            half = (x.shape[-1] + 1) // 2  # torch.chunk's split: the first part is the larger
            x = torch.cat((F.pad(x[..., :half], (0, 0, 1, -1)), x[..., half:]), dim=-1)
        hidden = self.to_hidden(x)  # [v | u]
        qk = RotaryEmbedding.rotate_(self.qk_offset_scale(self.to_qk(x)), *rope)
        quad_q, lin_q, quad_k, lin_k = qk.unbind(dim=-2)
        att_v, att_u = self.attend(quad_q, quad_k, lin_q, lin_k, hidden).chunk(2, dim=-1)
        v, u = hidden.chunk(2, dim=-1)
        if torch.is_grad_enabled():
            out = (att_u * v) * torch.sigmoid(att_v * u)
        else:  # the same in place, in the attention output (no 1024-wide temporaries)
            out = att_u.mul_(v).mul_(att_v.mul_(u).sigmoid_())
        return residual + self.to_out(out)

    def attend(self, quad_q, quad_k, lin_q, lin_k, values):
        """Grouped quadratic plus global linear attention of ``values [batch, frames, e]``.

        The linear part ``q_lin (k_lin^T values) / frames`` is computed first and each group's
        quadratic part is accumulated into it in place (``baddbmm_``): ``values`` (``e`` = 2048
        wide in the full model) is never padded, copied or added. Only the 128-wide queries and
        keys are zero-padded to whole groups (zero keys get no attention weight).
        """
        b, n, e = values.shape
        g = self.group_size
        pad = -n % g
        q, k = (F.pad(t, (0, 0, 0, pad)).unflatten(1, (-1, g)) for t in (quad_q, quad_k))
        attn = self.attn_dropout(F.relu(q @ k.transpose(-1, -2) / g).square())  # [b, G, g, g]
        if b == 1:  # 2-D products: bmm copies the strided query and its 2048-wide result
            out = torch.mm(lin_q[0], torch.mm(lin_k[0].t(), values[0]) / n).unsqueeze(0)
        else:
            out = lin_q @ (lin_k.transpose(1, 2) @ values / n)
        full = n - n % g
        for i in range(b):
            if full:
                out[i, :full].view(-1, g, e).baddbmm_(attn[i, :full // g],
                                                      values[i, :full].reshape(-1, g, e))
            if full < n:  # the last, partial group
                out[i, full:].addmm_(attn[i, -1, :n - full, :n - full], values[i, full:])
        return out


# --------------------------------------------------------------------------------------------
# Memory: gated, dilated FSMN
# --------------------------------------------------------------------------------------------


class DilatedFSMN(nn.Module):
    """FSMN memory with a dense, dilated convolution stack (clearvoice ``fsmn.py``,
    UniDeepFsmn_dilated + DilatedDenseNet). ``[batch, frames, dim] -> [batch, frames, dim]``.

    ``p = project(relu(linear(x)))``; then ``depth`` layers (dilation 1, 2, ...), each a
    grouped conv (kernel ``2*order - 1``, same padding, ``dim`` groups) over the concatenation
    of all previous outputs and ``p`` (newest first), instance norm and PReLU. Output: ``x`` plus
    the last layer's output.
    """

    def __init__(self, dim: int, hidden: int, order: int = 20, depth: int = 2):
        super().__init__()
        self.linear = nn.Linear(dim, hidden)
        self.project = nn.Linear(hidden, dim, bias=False)
        k = 2 * order - 1
        self.convs = nn.ModuleList(
            nn.Conv1d(dim * (i + 1), dim, k, dilation=2**i, padding=(order - 1) * 2**i,
                      groups=dim, bias=False)
            for i in range(depth))
        self.norms = nn.ModuleList(nn.InstanceNorm1d(dim, affine=True) for _ in range(depth))
        self.acts = nn.ModuleList(nn.PReLU(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.project(F.relu(self.linear(x)))  # [batch, frames, dim], channels last
        out = None
        for conv, norm, act in zip(self.convs, self.norms, self.acts):
            if out is not None:  # not after the last layer: only its output is used
                dense = torch.cat((out, dense), dim=-1)
            out = conv_along_frames(dense, conv.weight, conv.dilation[0])
            # instance norm over frames, per channel (two passes; torch.var_mean along the
            # frames of a channel-last tensor is 5x slower), then a per-channel PReLU
            centred = out - out.mean(dim=1, keepdim=True)
            scale = torch.rsqrt(centred.square().mean(dim=1, keepdim=True) + norm.eps) * norm.weight
            out = F.prelu(torch.addcmul(norm.bias, centred, scale).transpose(1, 2), act.weight)
            out = out.transpose(1, 2)
        return x + out


class GatedFSMN(nn.Module):
    """``to_v(x) * fsmn(to_u(x)) + x`` with two LayerNorm :class:`FFConvM` branches
    (clearvoice ``mossformer2_block.py`` Gated_FSMN_dilated)."""

    def __init__(self, dim: int, order: int = 20, kernel_size: int = 17, dropout: float = 0.1):
        super().__init__()
        self.to_u = FFConvM(dim, dim, "layer", kernel_size, dropout)
        self.to_v = FFConvM(dim, dim, "layer", kernel_size, dropout)
        self.fsmn = DilatedFSMN(dim, dim, order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, self.to_v(x), self.fsmn(self.to_u(x)))


class GatedFSMNBlock(nn.Module):
    """The recurrent-free memory block of a MossFormer2 layer (clearvoice ``mossformer2_block.py``
    Gated_FSMN_Block_Dilated): linear dim->inner, PReLU, LayerNorm, :class:`GatedFSMN`,
    LayerNorm, linear inner->dim, plus the input. ``[batch, frames, dim]`` in and out."""

    def __init__(self, dim: int, inner: int = 256, order: int = 20, kernel_size: int = 17,
                 dropout: float = 0.1):
        super().__init__()
        self.in_proj = nn.Linear(dim, inner)
        self.in_act = nn.PReLU()
        self.norm1 = nn.LayerNorm(inner)
        self.gated = GatedFSMN(inner, order, kernel_size, dropout)
        self.norm2 = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.in_act(self.in_proj(x)))
        return x + self.out_proj(self.norm2(self.gated(h)))


class MossFormer2Layer(nn.Module):
    """One MossFormer2 layer: gated attention, then the FSMN memory block."""

    def __init__(self, dim, group_size=256, qk_dim=128, expansion_factor=4.0, fsmn_dim=256,
                 fsmn_order=20, kernel_size=17, dropout=0.1):
        super().__init__()
        self.attention = FLASH_ShareA_FFConvM(dim, group_size, qk_dim, expansion_factor,
                                              kernel_size, dropout)
        self.fsmn = GatedFSMNBlock(dim, fsmn_dim, fsmn_order, kernel_size, dropout)

    def forward(self, x, rope):
        return self.fsmn(self.attention(x, rope))


# --------------------------------------------------------------------------------------------
# Mask net and the whole model
# --------------------------------------------------------------------------------------------


class MossFormer2MaskNet(nn.Module):
    """MossFormer2 mask estimator: ``[batch, N, frames]`` -> masks ``[batch, n_src, N, frames]``.

    Arguments
    ---------
    N : int
        Encoder channels (also the width of the MossFormer2 layers).
    num_layers : int
        Number of MossFormer2 layers R.
    n_src : int
        Number of sources.
    group_size : int
        Frames per group of the quadratic attention.
    qk_dim : int
        Width of the shared query/key projection.
    expansion_factor : float
        Width of ``[v | u]`` relative to N.
    fsmn_dim : int
        Width inside the FSMN memory blocks.
    fsmn_order : int
        FSMN memory order (conv kernel ``2 * order - 1``).
    kernel_size : int
        Kernel of the depthwise convs of the feed-forward projections.
    dropout : float
        Dropout of attention weights and feed-forward projections (training only).
    rotary_dim : int
        Query/key features that get the rotary embedding (at most ``qk_dim``).
    checkpoint_layers : bool
        When gradients are computed, keep only each layer's input and recompute the layer
        during the backward pass (activation checkpointing; dropout masks are replayed), for
        ~25 % more compute. A training step of the full model on 2 s then holds 1.6 GB of live
        memory (the reference code: 12.2 GB), and 4-s segments train in 24 GB
        (``python bench/mossformer2.py``). No effect on inference.
    """

    def __init__(self, N=512, num_layers=24, n_src=2, group_size=256, qk_dim=128,
                 expansion_factor=4.0, fsmn_dim=256, fsmn_order=20, kernel_size=17,
                 dropout=0.1, rotary_dim=32, checkpoint_layers=True):
        super().__init__()
        self.N, self.n_src = N, n_src
        self.checkpoint_layers = checkpoint_layers
        self.norm = GlobalNorm(N)
        self.in_proj = nn.Linear(N, N, bias=False)
        self.pos_enc = ScaledSinuEmbedding(N)
        self.rotary = RotaryEmbedding(min(rotary_dim, qk_dim))
        self.layers = nn.ModuleList(
            MossFormer2Layer(N, group_size, qk_dim, expansion_factor, fsmn_dim, fsmn_order,
                             kernel_size, dropout)
            for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(N, eps=1e-6)
        self.skip_norm = GlobalNorm(N)
        self.prelu = nn.PReLU()
        self.mask_proj = nn.Linear(N, n_src * N)
        self.tanh_proj = nn.Linear(N, N)
        self.gate_proj = nn.Linear(N, N)
        self.out_proj = nn.Linear(N, N, bias=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        frames = w.shape[-1]
        x = self.in_proj(self.norm(w.transpose(1, 2)))  # [batch, frames, N]
        x = x + self.pos_enc(frames)
        skip = x
        rope = self.rotary(frames)
        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled() and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, use_reentrant=False)
            else:
                x = layer(x, rope)
        x = self.prelu(self.skip_norm(self.out_norm(x)) + skip)
        m = self.mask_proj(x).unflatten(-1, (self.n_src, self.N))  # [batch, frames, n_src, N]
        m = torch.tanh(self.tanh_proj(m)) * torch.sigmoid(self.gate_proj(m))
        m = F.relu(self.out_proj(m))
        return m.permute(0, 2, 3, 1)


class _UnpaddedEncoder(Encoder):
    """The ClearerVoice framing: the input is padded only when shorter than one frame, so the
    last ``(time - L) % stride`` samples are left out (the decoder gives zeros there)."""

    def padding_for(self, length: int) -> int:
        return max(0, self.kernel_size - length)


class _ZeroTailDecoder(Decoder):
    """Transposed conv, then zero-padded or trimmed to the input length."""

    def forward(self, w: torch.Tensor, length: int) -> torch.Tensor:
        x = self.deconv(w).squeeze(1)
        return F.pad(x, (0, max(0, length - x.shape[-1])))[..., :length]


class MossFormer2(EncoderMaskerDecoder):
    """MossFormer2 separation model: ``mix [batch, time] -> [batch, time, n_src]``.

    Encoder (N filters, kernel L, stride L/2, ReLU) -> :class:`MossFormer2MaskNet` ->
    transposed-conv decoder. See :class:`MossFormer2MaskNet` for the other arguments. Paper
    configurations: ``MossFormer2(N=512, num_layers=24)`` (55.7 M parameters) and
    ``MossFormer2(N=384, num_layers=25)`` (37.8 M).
    """

    def __init__(self, N=512, L=16, num_layers=24, n_src=2, group_size=256, qk_dim=128,
                 expansion_factor=4.0, fsmn_dim=256, fsmn_order=20, kernel_size=17,
                 dropout=0.1, checkpoint_layers=True):
        super().__init__(
            _UnpaddedEncoder(L, N),
            MossFormer2MaskNet(N, num_layers, n_src, group_size, qk_dim, expansion_factor,
                               fsmn_dim, fsmn_order, kernel_size, dropout,
                               checkpoint_layers=checkpoint_layers),
            _ZeroTailDecoder(L, N),
        )
        self.config = dict(N=N, L=L, num_layers=num_layers, n_src=n_src, group_size=group_size,
                           qk_dim=qk_dim, expansion_factor=expansion_factor, fsmn_dim=fsmn_dim,
                           fsmn_order=fsmn_order, kernel_size=kernel_size, dropout=dropout)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

