"""STFT-mask family: a recurrent magnitude-mask baseline and the oracle (ideal) masks.

The baseline plugs into :class:`modules.models.base.EncoderMaskerDecoder`: the encoder is the STFT
(complex ``[batch, F, frames]``), the masker predicts one real mask per source from the log
magnitude with a (B)LSTM, the masks multiply the complex mixture spectrum (the mixture phase is
kept) and the decoder is the inverse STFT. Trained with SI-SNR + PIT like every other model here.

:class:`STFTMaskExtractor` is the same mask network for target-speaker extraction: one mask,
conditioned on the pretrained GE2E d-vector of an enrolment of the target speaker.

Oracle masks (Wang, "On ideal binary mask as the computational goal of auditory scene analysis",
2005; Narayanan & Wang, ICASSP 2013) use the reference sources and bound what a magnitude mask
with the mixture phase can reach: IBM gives each time-frequency unit to the loudest source, IRM
weights it by ``|S_i| / sum_j |S_j|``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from modules.data.audio import AudioError
from modules.models.base import EncoderMaskerDecoder, mask_activation
from modules.models.clustering import deep_clustering_loss, kmeans
from modules.models.losses import pit_si_snr_loss
from modules.models.speaker import GE2E_DIM, GE2EEncoder, sample_lengths


def _window(n_fft: int, like: torch.Tensor) -> torch.Tensor:
    return torch.hann_window(n_fft, device=like.device, dtype=torch.float32)


def log_magnitude(w: torch.Tensor) -> torch.Tensor:
    """Complex STFT or magnitude ``[B, F, T]`` -> ``log(1 + |X|)`` frames ``[B, T, F]``."""
    return torch.log1p(w.abs() if w.is_complex() else w).transpose(1, 2)


def frames_to_masks(m: torch.Tensor, n_src: int, n_freq: int) -> torch.Tensor:
    """A per-frame head's output ``[B, T, n_src * F]`` -> ``[B, n_src, F, T]`` (before the mask
    activation)."""
    return m.view(m.shape[0], -1, n_src, n_freq).permute(0, 2, 3, 1)


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

    Input complex or real ``[batch, F, frames]``; output ``[batch, n_src, F, frames]``; the
    recurrence runs in float32 (also under autocast). With
    ``cond_dim`` > 0, ``forward`` also takes a ``[batch, cond_dim]`` vector that joins every
    frame's input (VoiceFilter's conditioning), and ``frames [batch]`` (valid frames per item)
    keeps the padding of a ragged batch out of the recurrence.
    """

    def __init__(self, n_freq: int, hidden: int = 256, layers: int = 2, n_src: int = 2,
                 bidirectional: bool = True, dropout: float = 0.0, mask_act: str = "sigmoid",
                 cond_dim: int = 0):
        super().__init__()
        self.n_src, self.n_freq, self.cond_dim = n_src, n_freq, cond_dim
        self.rnn = nn.LSTM(n_freq + cond_dim, hidden, layers, batch_first=True, dropout=dropout,
                           bidirectional=bidirectional)
        self.proj = nn.Linear(hidden * (2 if bidirectional else 1), n_src * n_freq)
        self.mask_act = mask_activation(mask_act)

    def forward(self, w, condition=None, frames=None):
        feats = log_magnitude(w)  # [B, frames, F]
        if self.cond_dim:
            if condition is None or condition.shape != (w.shape[0], self.cond_dim):
                raise ValueError(f"this masker is conditioned: give a [batch, {self.cond_dim}] vector, got "
                                 f"{None if condition is None else tuple(condition.shape)}")
            feats = torch.cat([feats, condition[:, None, :].to(feats.dtype).expand(-1, feats.shape[1], -1)], -1)
        # float32 also under autocast: CPU autocast leaves a packed LSTM in float32, so an item
        # computes the same in a ragged batch as alone
        with torch.autocast(feats.device.type, enabled=False):
            feats = feats.float()
            if frames is not None and bool((frames < feats.shape[1]).any()):
                packed = pack_padded_sequence(feats, frames.cpu(), batch_first=True, enforce_sorted=False)
                h, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=feats.shape[1])
            else:
                h, _ = self.rnn(feats)
        return self.mask_act(frames_to_masks(self.proj(h), self.n_src, self.n_freq))


class STFTMaskNet(EncoderMaskerDecoder):
    """STFT magnitude-mask separation baseline ``[batch, time]`` -> ``[batch, time, n_src]``."""

    def __init__(self, n_fft=256, hop_length=64, hidden=256, layers=2, n_src=2, mask_act="sigmoid"):
        super().__init__(STFTEncoder(n_fft, hop_length),
                         RNNMasker(n_fft // 2 + 1, hidden, layers, n_src, mask_act=mask_act),
                         ISTFTDecoder(n_fft, hop_length))


class STFTMaskExtractor(nn.Module):
    """Target-speaker extraction with an STFT magnitude mask: ``(mix [batch, time], enroll
    [batch, time'])`` -> target estimate ``[batch, time]``.

    The frozen pretrained GE2E d-vector of the enrolment (:class:`GE2EEncoder`, cached per
    enrolment) joins every frame of the mixture's log magnitude, a BLSTM predicts one mask on the
    complex STFT of the mixture, and the inverse STFT gives the estimate: the scheme of VoiceFilter
    (Wang et al., Interspeech 2019; theirs has convolutions before the LSTM and a spectrogram
    loss, ours the BLSTM of :class:`STFTMaskNet` trained on SI-SDR). In a ragged batch each item
    gives what it gives alone: its STFT, recurrence and inverse run on its own samples and frames,
    and the estimate is zero past its end.
    """

    def __init__(self, n_fft: int = 256, hop_length: int = 64, hidden: int = 256, layers: int = 2,
                 sample_rate: int = 8000, mask_act: str = "sigmoid", dropout: float = 0.0):
        super().__init__()
        self.encoder = STFTEncoder(n_fft, hop_length)
        self.masker = RNNMasker(n_fft // 2 + 1, hidden, layers, n_src=1, dropout=dropout,
                                mask_act=mask_act, cond_dim=GE2E_DIM)
        self.decoder = ISTFTDecoder(n_fft, hop_length)
        self.ge2e = GE2EEncoder(sample_rate=sample_rate, freeze=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ge2e.eval()  # frozen: always in inference mode
        return self

    def min_samples(self) -> tuple[int, int]:
        """Shortest (mixture, enrolment) in samples: the STFT's reflection padding needs more
        than half a window; the d-vector, one analysis window at its own rate."""
        return self.encoder.n_fft // 2 + 1, int(self.ge2e.sample_rate * 0.025) + 1

    def speaker_embedding(self, enroll: torch.Tensor, enroll_lens=None) -> torch.Tensor:
        return self.ge2e(enroll, enroll_lens)

    def forward(self, mix: torch.Tensor, enroll: torch.Tensor, mix_lens=None, enroll_lens=None):
        mix = mix[None] if mix.dim() == 1 else mix
        enroll = enroll[None] if enroll.dim() == 1 else enroll
        if mix.dim() != 2 or enroll.dim() != 2 or mix.shape[0] != enroll.shape[0]:
            raise AudioError(f"expected mix [batch, time] and enroll [batch, time'] with the same batch, "
                             f"got {tuple(mix.shape)} and {tuple(enroll.shape)}")
        shortest = self.min_samples()[0]
        if mix.shape[-1] < shortest:
            raise AudioError(f"the mixture has {mix.shape[-1]} samples; this model needs at least {shortest}")
        samples = sample_lengths(mix, mix_lens)
        if int(samples.min()) < shortest:
            raise AudioError(f"a mixture of the batch has {int(samples.min())} real samples; this model "
                             f"needs at least {shortest}")
        embedding = self.speaker_embedding(enroll, enroll_lens)
        if mix_lens is None or bool((samples == mix.shape[-1]).all()):
            spec = self.encoder(mix)
            return self.decoder(self.masker(spec, embedding)[:, 0] * spec, mix.shape[-1])
        # a ragged batch: each item's STFT and inverse on its own samples, the BLSTM on its own
        # frames, so every item gives what it gives alone
        specs = [self.encoder(mix[b:b + 1, :n]) for b, n in enumerate(samples.tolist())]
        frames = torch.tensor([x.shape[-1] for x in specs])
        spec = torch.cat([F.pad(x, (0, int(frames.max()) - x.shape[-1])) for x in specs])
        masked = self.masker(spec, embedding, frames)[:, 0] * spec
        return torch.cat([F.pad(self.decoder(masked[b:b + 1, :, :t], n), (0, mix.shape[-1] - n))
                          for b, (n, t) in enumerate(zip(samples.tolist(), frames.tolist()))])


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


class ClusteringMasker(nn.Module):
    """Deep-clustering masker: a BLSTM maps the log magnitude of the mixture STFT to a unit-norm
    ``emb_dim``-dimensional embedding per time-frequency unit; k-means over the embeddings of the
    active units (within ``active_db`` of the item's loudest unit) gives every unit to its nearest
    centroid. Complex ``[batch, F, frames]`` -> binary masks ``[batch, n_src, F, frames]``.

    With ``mask_head=True`` (Chimera++, Wang, Le Roux & Hershey, ICASSP 2018) a second linear
    head on the same BLSTM states predicts one sigmoid mask per source, and ``forward`` returns
    those masks instead of clustering (no k-means at inference).
    """

    def __init__(self, n_freq, hidden=300, layers=2, emb_dim=20, n_src=2, active_db=-40.0,
                 dropout=0.0, seed=0, mask_head=False):
        super().__init__()
        self.n_freq, self.emb_dim, self.n_src, self.active_db, self.seed = (
            n_freq, emb_dim, n_src, active_db, seed)
        self.rnn = nn.LSTM(n_freq, hidden, layers, batch_first=True, dropout=dropout,
                           bidirectional=True)
        self.proj = nn.Linear(2 * hidden, n_freq * emb_dim)
        self.mask_proj = nn.Linear(2 * hidden, n_src * n_freq) if mask_head else None

    def states(self, spec):
        """Complex STFT ``[B, F, T]`` -> BLSTM states ``[B, T, 2 * hidden]``, in float32 also
        under autocast (as :class:`RNNMasker`)."""
        with torch.autocast(spec.device.type, enabled=False):
            return self.rnn(log_magnitude(spec).float())[0]

    def embed(self, spec, h: Optional[torch.Tensor] = None):
        """Complex STFT ``[B, F, T]`` -> unit-norm embeddings ``[B, T * F, D]`` (time-major);
        ``h``: the BLSTM states, if already computed."""
        h = self.states(spec) if h is None else h
        v = torch.tanh(self.proj(h)).view(spec.shape[0], -1, self.emb_dim)
        return torch.nn.functional.normalize(v, dim=-1)

    def masks(self, spec, h: Optional[torch.Tensor] = None):
        """The mask head's sigmoid masks ``[B, n_src, F, T]`` (``mask_head=True`` only)."""
        if self.mask_proj is None:
            raise RuntimeError("this deep-clustering masker has no mask head (mi_weight=0)")
        h = self.states(spec) if h is None else h
        return torch.sigmoid(frames_to_masks(self.mask_proj(h), self.n_src, self.n_freq))

    def active(self, spec):
        """``[B, T * F]`` bool: units within ``active_db`` of the item's loudest unit."""
        db = 20 * torch.log10(spec.abs().transpose(1, 2).flatten(1) + 1e-8)
        return db > db.amax(1, keepdim=True) + self.active_db

    def cluster(self, spec, v):
        """Binary masks ``[B, n_src, F, T]`` from k-means over the embeddings ``v [B, T * F, D]``."""
        out = []
        for b in range(spec.shape[0]):
            act = self.active(spec[b:b + 1])[0]
            points = v[b][act] if act.sum() >= self.n_src else v[b]
            _, centroids, _ = kmeans(points.float(), self.n_src, seed=self.seed)
            labels = torch.cdist(v[b].float(), centroids).argmin(1)                # every unit
            masks = torch.nn.functional.one_hot(labels, self.n_src).T.float()      # [S, T*F]
            out.append(masks.view(self.n_src, spec.shape[2], self.n_freq).transpose(1, 2))
        return torch.stack(out)

    def forward(self, spec):
        if self.mask_proj is not None:
            return self.masks(spec)
        return self.cluster(spec, self.embed(spec))


class DeepClusteringNet(EncoderMaskerDecoder):
    """Deep clustering separation (Hershey, Chen, Le Roux & Watanabe, ICASSP 2016).

    STFT encoder -> :class:`ClusteringMasker` (binary masks from k-means over the embeddings, or
    with ``mi_weight`` > 0 the sigmoid masks of its mask head) -> inverse STFT, ``[batch, time]``
    -> ``[batch, time, n_src]``. Its training objective
    (:meth:`training_loss`) is the deep-clustering loss ``||VV^T - YY^T||^2`` per item (low-rank
    form, :func:`modules.models.clustering.deep_clustering_loss`), Y being the ideal binary
    assignment of each unit to its loudest source, over the active units.

    ``mi_weight`` > 0 makes it Chimera++ (Wang, Le Roux & Hershey, ICASSP 2018): a mask head
    shares the BLSTM, the loss is ``(1 - mi_weight) * DC + mi_weight * (-PIT SI-SNR in dB)`` of
    the mask head's separation (the paper's mask loss is a truncated phase-sensitive spectrum
    loss; ours is the waveform SI-SNR every other model here trains on), and the separation at
    inference comes from the mask head.
    """

    def __init__(self, n_fft=256, hop_length=64, hidden=300, layers=2, emb_dim=20, n_src=2,
                 active_db=-40.0, dropout=0.0, seed=0, mi_weight=0.0):
        if isinstance(mi_weight, bool) or not isinstance(mi_weight, (int, float)) or not 0 <= mi_weight < 1:
            raise ValueError(f"mi_weight must be a number in [0, 1) (0: deep clustering alone; 1 would "
                             f"train no embedding: use stft-mask.yaml for a mask network alone), got "
                             f"{mi_weight!r}")
        super().__init__(STFTEncoder(n_fft, hop_length),
                         ClusteringMasker(n_fft // 2 + 1, hidden, layers, emb_dim, n_src,
                                          active_db, dropout, seed, mask_head=mi_weight > 0),
                         ISTFTDecoder(n_fft, hop_length))
        self.mi_weight = mi_weight

    def losses(self, mix, sources):
        """Per item: the deep-clustering loss and the mask head's ``-PIT SI-SNR`` in dB (``None``
        without a mask head), both from one pass of the shared BLSTM."""
        spec = self.encode(mix)
        h = self.masker.states(spec)
        v = self.masker.embed(spec, h)
        s = self.encoder(sources.transpose(1, 2).flatten(0, 1)).abs()          # [B*S, F, T]
        s = s.view(mix.shape[0], -1, *s.shape[1:])
        owner = s.argmax(1).transpose(1, 2).flatten(1)                         # [B, T*F]
        dc = deep_clustering_loss(v.float(), owner, self.masker.active(spec).float())
        if self.masker.mask_proj is None:
            return dc, None
        est = self.decode(self.apply_masks(spec, self.masker.masks(spec, h)), mix.shape[-1])
        return dc, pit_si_snr_loss(est.float(), sources.float())

    def training_loss(self, mix, sources):
        dc, mi = self.losses(mix, sources)
        return dc if mi is None else (1 - self.mi_weight) * dc + self.mi_weight * mi
