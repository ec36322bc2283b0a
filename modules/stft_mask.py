"""STFT-mask family: a recurrent magnitude-mask baseline and the oracle (ideal) masks.

The baseline plugs into :class:`modules.tasnet.EncoderMaskerDecoder`: the encoder is the STFT
(complex ``[batch, F, frames]``), the masker predicts one real mask per source from the log
magnitude with a (B)LSTM, the masks multiply the complex mixture spectrum (the mixture phase is
kept) and the decoder is the inverse STFT. Trained with SI-SNR + PIT like every other model here.

Oracle masks (Wang, "On ideal binary mask as the computational goal of auditory scene analysis",
2005; Narayanan & Wang, ICASSP 2013) use the reference sources and bound what a magnitude mask
with the mixture phase can reach: IBM gives each time-frequency unit to the loudest source, IRM
weights it by ``|S_i| / sum_j |S_j|``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .tasnet import EncoderMaskerDecoder, mask_activation


def _window(n_fft, like):
    return torch.hann_window(n_fft, device=like.device, dtype=torch.float32)


class STFTEncoder(nn.Module):
    """``[batch, time]`` -> complex STFT ``[batch, n_fft // 2 + 1, frames]`` (Hann, centred)."""

    def __init__(self, n_fft: int = 256, hop_length: int = 64):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length

    def padding_for(self, length: int) -> int:
        return 0

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return torch.stft(x.float(), self.n_fft, self.hop_length, window=_window(self.n_fft, x),
                              return_complex=True)


class ISTFTDecoder(nn.Module):
    """Complex ``[batch, F, frames]`` -> ``[batch, length]``."""

    def __init__(self, n_fft: int = 256, hop_length: int = 64):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length

    def forward(self, spec, length: int):
        with torch.autocast(spec.device.type, enabled=False):
            return torch.istft(spec, self.n_fft, self.hop_length, window=_window(self.n_fft, spec),
                               length=length)


class RNNMasker(nn.Module):
    """Magnitude-mask estimator: log(1 + |X|) -> (B)LSTM -> linear -> one mask per source.

    Input complex or real ``[batch, F, frames]``; output ``[batch, n_src, F, frames]``.
    """

    def __init__(self, n_freq: int, hidden: int = 256, layers: int = 2, n_src: int = 2,
                 bidirectional: bool = True, dropout: float = 0.0, mask_act: str = "sigmoid"):
        super().__init__()
        self.n_src, self.n_freq = n_src, n_freq
        self.rnn = nn.LSTM(n_freq, hidden, layers, batch_first=True, dropout=dropout,
                           bidirectional=bidirectional)
        self.proj = nn.Linear(hidden * (2 if bidirectional else 1), n_src * n_freq)
        self.mask_act = mask_activation(mask_act)

    def forward(self, w):
        feats = torch.log1p(w.abs() if w.is_complex() else w).transpose(1, 2)  # [B, frames, F]
        h, _ = self.rnn(feats)
        m = self.proj(h).view(w.shape[0], -1, self.n_src, self.n_freq)
        return self.mask_act(m.permute(0, 2, 3, 1))


class STFTMaskNet(EncoderMaskerDecoder):
    """STFT magnitude-mask separation baseline ``[batch, time]`` -> ``[batch, time, n_src]``."""

    def __init__(self, n_fft=256, hop_length=64, hidden=256, layers=2, n_src=2, mask_act="sigmoid"):
        super().__init__(STFTEncoder(n_fft, hop_length),
                         RNNMasker(n_fft // 2 + 1, hidden, layers, n_src, mask_act=mask_act),
                         ISTFTDecoder(n_fft, hop_length))


def ideal_mask_separation(mix: torch.Tensor, sources: torch.Tensor, kind: str = "irm",
                          n_fft: int = 256, hop_length: int = 64) -> torch.Tensor:
    """Separate ``mix [time]`` with an oracle mask computed from ``sources [time, S]``.

    ``kind`` is ``"ibm"`` (ideal binary mask) or ``"irm"`` (ideal ratio mask,
    ``|S_i| / sum_j |S_j|``). Returns ``[time, S]``.
    """
    enc, dec = STFTEncoder(n_fft, hop_length), ISTFTDecoder(n_fft, hop_length)
    X = enc(mix.unsqueeze(0))[0]                      # [F, frames]
    S = enc(sources.T).abs()                          # [S, F, frames]
    if kind == "irm":
        masks = S / S.sum(0, keepdim=True).clamp_min(1e-8)
    elif kind == "ibm":
        masks = torch.nn.functional.one_hot(S.argmax(0), S.shape[0]).permute(2, 0, 1).float()
    else:
        raise ValueError(f"unknown oracle mask {kind!r}; use 'ibm' or 'irm'")
    return dec(masks * X.unsqueeze(0), mix.shape[-1]).T
