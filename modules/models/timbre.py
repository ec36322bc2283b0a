"""Timbre separation and transcription: a note-aligned front end, a shared backbone, note and
onset heads, and an embedding head whose clusters are the instruments (deep clustering).

Front end (:class:`NoteFrontEnd`): a complex STFT mapped onto one bin per semitone (MIDI
pitches ``min_pitch`` .. ``min_pitch + n_pitches - 1``) by a triangular filterbank that is
linear in the complex spectrum, so the log-frequency units keep their phase. Features per unit:
log magnitude, the same log magnitude shifted by the interval of each of ``harmonics`` (harmonic
stacking: channel h holds the energy at h x the unit's pitch, so a note's partials line up on its
fundamental), and the phase advance between frames minus the advance expected at the unit's
centre frequency (cos, sin), which separates a partial sitting exactly on the pitch from one
between pitches.

Units are (pitch, frame) pairs; the clustering, the note posteriors and the masks all live on
them. :func:`unit_targets` turns an example's stems and notes into the training targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.data.music import Note
from modules.models.clustering import ClusteringAttention, cluster_units


def midi_hz(pitch):
    return 440.0 * 2.0 ** ((torch.as_tensor(pitch, dtype=torch.float64) - 69) / 12)


def semitone_filterbank(sample_rate, n_fft, min_pitch, n_pitches, min_width_bins=1.5):
    """``[n_pitches, n_fft // 2 + 1]`` triangular weights centred on each MIDI pitch, one
    semitone to each side (at least ``min_width_bins`` STFT bins, so low pitches are not empty);
    each row sums to one."""
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    centre = midi_hz(torch.arange(min_pitch, min_pitch + n_pitches))
    bin_hz = sample_rate / n_fft
    floor = torch.full_like(centre, min_width_bins * bin_hz)
    lo = torch.maximum(centre * (1 - 2 ** (-1 / 12)), floor)   # distance to the semitone below
    hi = torch.maximum(centre * (2 ** (1 / 12) - 1), floor)    # and above
    d = freqs[None, :] - centre[:, None]
    w = torch.where(d < 0, 1 + d / lo[:, None], 1 - d / hi[:, None]).clamp_min(0)
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    return w.float()


class NoteFrontEnd(nn.Module):
    """``wave [batch, time]`` -> (features ``[batch, C, P, T]``, complex units ``[batch, P, T]``).

    C = ``len(harmonics)`` log-magnitude channels + 2 phase channels.
    """

    def __init__(self, sample_rate=16000, n_fft=2048, hop_length=256, min_pitch=28, n_pitches=80,
                 harmonics=(0.5, 1, 2, 3, 4, 5)):
        super().__init__()
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.min_pitch, self.n_pitches = min_pitch, n_pitches
        self.harmonics = tuple(harmonics)
        self.register_buffer("fbank", semitone_filterbank(sample_rate, n_fft, min_pitch, n_pitches),
                             persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        # expected phase advance over one hop at each pitch's centre frequency
        advance = 2 * math.pi * midi_hz(torch.arange(min_pitch, min_pitch + n_pitches)) * hop_length / sample_rate
        self.register_buffer("advance", advance.float(), persistent=False)
        self.shifts = [round(12 * math.log2(h)) for h in self.harmonics]

    @property
    def channels(self) -> int:
        return len(self.harmonics) + 2

    def units(self, wave: torch.Tensor) -> torch.Tensor:
        """Complex log-frequency units ``[batch, P, T]``."""
        with torch.autocast(wave.device.type, enabled=False):
            spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window,
                              return_complex=True)
            return torch.einsum("pf,bft->bpt", self.fbank.to(torch.complex64), spec)

    def frames(self, n_samples: int) -> int:
        return n_samples // self.hop_length + 1

    def features(self, units: torch.Tensor) -> torch.Tensor:
        mag = torch.log1p(100 * units.abs())                     # [B, P, T]
        stacked = []
        for s in self.shifts:                                    # channel h: energy at h x pitch
            if s >= 0:
                shifted = F.pad(mag[:, s:], (0, 0, 0, s))
            else:
                shifted = F.pad(mag[:, :s], (0, 0, -s, 0))
            stacked.append(shifted)
        phase = torch.angle(units)
        dphi = phase[..., 1:] - phase[..., :-1] - self.advance[None, :, None]
        dphi = F.pad(dphi, (1, 0))
        weight = (mag > 0.01).float()                            # phase of silence is noise
        return torch.stack(stacked + [torch.cos(dphi) * weight, torch.sin(dphi) * weight], 1)

    def forward(self, wave):
        units = self.units(wave)
        return self.features(units), units


def unit_targets(front_end: NoteFrontEnd, stems: torch.Tensor, notes, active_db: float = -40.0):
    """Training targets of one example on the front end's (pitch, frame) units.

    ``stems [time, n]``, ``notes``: one list of Note (seconds) per stem. Returns a dict:
    ``rolls [n, P, T]`` (1 while the stem plays that pitch), ``onsets [n, P, T]`` (1 at the
    frame of each note start), ``owner [P, T]`` (index of the stem with the most energy in the
    unit), ``active [P, T]`` (the mixture unit is within ``active_db`` of its loudest unit).
    """
    n = stems.shape[1]
    mix_units = front_end.units(stems.sum(1)[None])[0]
    stem_units = front_end.units(stems.T)                       # [n, P, T]
    P, T = mix_units.shape
    hop_s = front_end.hop_length / front_end.sample_rate
    rolls = torch.zeros(n, P, T)
    onsets = torch.zeros(n, P, T)
    for i, part in enumerate(notes):
        for note in part:
            p = note.pitch - front_end.min_pitch
            if not 0 <= p < P:
                continue
            a = max(0, int(round(note.onset / hop_s)))
            b = min(T, max(a + 1, int(round(note.offset / hop_s))))
            rolls[i, p, a:b] = 1
            if a < T:
                onsets[i, p, a] = 1
    energy = stem_units.abs().pow(2)
    owner = energy.argmax(0)
    level = 10 * torch.log10(mix_units.abs().pow(2) + 1e-12)
    active = level > level.max() + active_db
    return {"rolls": rolls, "onsets": onsets, "owner": owner, "active": active}


class _ResBlock(nn.Module):
    """GroupNorm -> ReLU -> 3x3 conv dilated in time (and in pitch, to span harmonics), residual."""

    def __init__(self, channels, time_dilation=1, pitch_dilation=1):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=(pitch_dilation, time_dilation),
                              dilation=(pitch_dilation, time_dilation))

    def forward(self, x):
        return x + self.conv(F.relu(self.norm(x)))


class TimbreNet(nn.Module):
    """Front end -> shared backbone -> note head, onset head, and embedding head.

    ``wave [batch, time]`` -> dict with ``note_logits``/``onset_logits`` ``[batch, P, T]``
    (instrument-agnostic posteriors per pitch and frame), ``embeddings [batch, D, P, T]``
    (unit-norm per unit) and the front end's complex ``units [batch, P, T]``.

    The embedding head is the clustering branch: :class:`~modules.models.clustering.ClusteringAttention`
    (flow attention by default, ``attention='linear'`` for plain linear attention) over all units,
    with the note posterior as the "Hebbian" weights of its keys and values (``hebbian=True``),
    then a 1x1 convolution to ``emb_dim``.
    """

    def __init__(self, front_end: NoteFrontEnd | None = None, channels=48, blocks=6, emb_dim=20,
                 heads=4, attention="flow", hebbian=True):
        super().__init__()
        self.front_end = front_end or NoteFrontEnd()
        self.inp = nn.Conv2d(self.front_end.channels, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(channels, 2 ** (i % 4), 1 + (i % 2) * 11)
                                      for i in range(blocks)])  # pitch dilation 12 = an octave
        self.note_head = nn.Conv2d(channels, 1, 1)
        self.onset_head = nn.Conv2d(channels, 1, 1)
        self.attention = ClusteringAttention(channels, heads, kind=attention)
        self.embed = nn.Conv2d(channels, emb_dim, 1)
        self.hebbian = hebbian

    def forward(self, wave: torch.Tensor) -> dict:
        feats, units = self.front_end(wave)
        h = self.blocks(self.inp(feats))
        note = self.note_head(h)[:, 0]
        onset = self.onset_head(F.relu(h))[:, 0]
        weights = torch.sigmoid(note) if self.hebbian else None
        emb = F.normalize(self.embed(self.attention(h, weights)), dim=1)
        return {"note_logits": note, "onset_logits": onset, "embeddings": emb, "units": units}


# --------------------------------------------------------------------------------------------
# From unit labels to notes, and scoring with mir_eval
# --------------------------------------------------------------------------------------------


def roll_to_notes(roll: torch.Tensor, hop_s: float, min_pitch: int, min_frames: int = 2,
                  onsets: torch.Tensor | None = None):
    """Piano roll ``[P, T]`` (bool) -> list of Note: each run of active frames of a pitch is a
    note, split where ``onsets [P, T]`` (bool, optional) marks a new attack inside a run (a
    repeated note); notes shorter than ``min_frames`` are dropped."""
    roll = roll.bool().cpu()
    starts = roll & ~F.pad(roll[:, :-1], (1, 0))
    if onsets is not None:
        starts |= roll & onsets.bool().cpu()
    ends = roll & ~F.pad(roll[:, 1:], (0, 1))                 # last frame of each run
    notes = []
    for p in torch.nonzero(roll.any(1)).flatten().tolist():
        s_idx = torch.nonzero(starts[p]).flatten().tolist()
        e_idx = torch.nonzero(ends[p]).flatten().tolist()
        for i, a in enumerate(s_idx):
            run_end = next(e for e in e_idx if e >= a) + 1
            b = min(run_end, s_idx[i + 1]) if i + 1 < len(s_idx) else run_end
            if b - a >= min_frames:
                notes.append(_note(p + min_pitch, a * hop_s, b * hop_s))
    return sorted(notes, key=lambda n: (n.onset, n.pitch))


def _note(pitch, onset, offset):
    return Note(pitch, onset, offset)


def note_f1(ref_notes, est_notes) -> dict:
    """mir_eval note precision / recall / F1, onset only (50 ms) and with offsets (20 % or 50 ms)."""
    import mir_eval
    import numpy as np

    def arrays(notes):
        if not notes:
            return np.zeros((0, 2)), np.zeros(0)
        return (np.array([[n.onset, max(n.offset, n.onset + 1e-3)] for n in notes]),
                np.array([float(midi_hz(n.pitch)) for n in notes]))

    (ri, rp), (ei, ep) = arrays(ref_notes), arrays(est_notes)
    out = {}
    for name, ratio in (("onset", None), ("offset", 0.2)):
        if len(ri) == 0 or len(ei) == 0:
            p = r = f = float(len(ri) == len(ei))
        else:
            p, r, f, _ = mir_eval.transcription.precision_recall_f1_overlap(
                ri, rp, ei, ep, offset_ratio=ratio)
        out.update({f"{name}_p": p, f"{name}_r": r, f"{name}_f1": f})
    return out


def best_assignment(score):
    """Rows (clusters) to columns (instruments) maximising the total ``score [K, n]``."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-torch.as_tensor(score).numpy())
    return {int(c): int(r) for r, c in zip(rows, cols)}  # instrument -> cluster


def per_instrument_f1(labels, roll, notes, hop_s, min_pitch, k, onsets=None) -> tuple:
    """Per-instrument onset F1 of the clustered roll, after the best cluster->instrument match.
    ``labels [P, T]`` cluster of each unit (-1: none), ``roll [P, T]`` estimated notes."""
    est = [roll_to_notes(roll & (labels == c), hop_s, min_pitch, onsets=onsets) for c in range(k)]
    f1 = torch.tensor([[note_f1(ref, e)["onset_f1"] for ref in notes] for e in est])
    match = best_assignment(f1)
    scores = [float(f1[match[i], i]) if i in match else 0.0 for i in range(len(notes))]
    return sum(scores) / len(scores), match, est


def evaluate_example(out: dict, targets: dict, notes, front_end: NoteFrontEnd, k: int | None = None,
                     threshold: float = 0.5, seed: int = 0) -> dict:
    """Metrics of one example (the model's outputs for it, without the batch dimension).

    Returns a dict of scalars: instrument-agnostic note P/R/F1 (onset only, with offsets),
    per-instrument onset F1 after the best assignment of clusters to instruments, the same with
    oracle clustering (each estimated unit given to the stem that owns it: the upper bound for
    this transcription) and with random clustering (the baseline), the clustering accuracy of the
    active units, and the number of clusters used. ``_labels``/``_roll`` are kept for pictures.
    """
    hop_s = front_end.hop_length / front_end.sample_rate
    n = len(notes)
    roll = torch.sigmoid(out["note_logits"]) > threshold
    onsets = torch.sigmoid(out["onset_logits"]) > threshold if "onset_logits" in out else None
    agnostic_ref = [x for part in notes for x in part]
    res = {f"agnostic_{key}": v for key, v in note_f1(
        agnostic_ref, roll_to_notes(roll, hop_s, front_end.min_pitch, onsets=onsets)).items()}
    units = roll | targets["active"]
    emb = out["embeddings"].flatten(1).T                       # [P*T, D]
    labels = cluster_units(emb, units.flatten(), k=k or n, seed=seed).view(roll.shape)
    k_used = int(labels.max()) + 1 if (labels >= 0).any() else 0
    res["instrument_onset_f1"], match, _ = per_instrument_f1(labels, roll, notes, hop_s,
                                                             front_end.min_pitch, max(k_used, 1), onsets)
    owner = torch.where(units, targets["owner"], torch.full_like(labels, -1))
    res["oracle_clusters_onset_f1"] = per_instrument_f1(owner, roll, notes, hop_s,
                                                         front_end.min_pitch, n, onsets)[0]
    gen = torch.Generator().manual_seed(seed)
    rand = torch.where(units, torch.randint(0, n, roll.shape, generator=gen), torch.full_like(labels, -1))
    res["random_clusters_onset_f1"] = per_instrument_f1(rand, roll, notes, hop_s,
                                                         front_end.min_pitch, n, onsets)[0]
    act = targets["active"]
    mapped = torch.full_like(labels, -1)
    for inst, cl in match.items():
        mapped[labels == cl] = inst
    res["cluster_accuracy"] = float((mapped[act] == targets["owner"][act]).float().mean()) if act.any() else 0.0
    res["n_clusters"] = k_used
    res["_labels"], res["_roll"], res["_match"] = labels, roll, match
    return res


def plot_example(path, units, rolls_true, labels, roll_est, match, instruments, front_end, title=None):
    """Mixture log-frequency spectrogram, the true per-instrument rolls (``rolls_true [n, P, T]``,
    or None to leave that panel out) and the estimated ones (``roll_est`` units labelled by
    cluster, drawn in the colour of the instrument ``match`` gives each cluster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(instruments)
    hop_s = front_end.hop_length / front_end.sample_rate
    extent = (0, units.shape[-1] * hop_s, front_end.min_pitch - 0.5,
              front_end.min_pitch + front_end.n_pitches - 0.5)
    est_img = np.zeros(roll_est.shape)
    for inst, cl in match.items():
        est_img[(roll_est & (labels == cl)).numpy()] = inst + 1
    panels = [(est_img, "estimated notes")]
    if rolls_true is not None:
        true_img = np.zeros(rolls_true.shape[1:])
        for i in range(rolls_true.shape[0]):
            true_img[rolls_true[i].numpy() > 0] = i + 1
        panels.insert(0, (true_img, "true notes"))
    fig, axes = plt.subplots(1 + len(panels), 1, figsize=(9, 2.4 * (1 + len(panels))), sharex=True)
    db = 20 * np.log10(units.abs().numpy() + 1e-6)
    axes[0].imshow(db, origin="lower", aspect="auto", extent=extent, vmin=db.max() - 70, cmap="magma")
    axes[0].set_title("mixture (semitone filterbank, dB)", fontsize=9, loc="left")
    colours = ["white", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    cmap = matplotlib.colors.ListedColormap(colours[: n + 1])
    for ax, (img, name) in zip(axes[1:], panels):
        ax.imshow(img, origin="lower", aspect="auto", extent=extent, cmap=cmap, vmin=0, vmax=n,
                  interpolation="nearest")
        ax.set_title(f"{name}: " + ", ".join(f"{c} = {i}" for c, i in zip(colours[1:], instruments)),
                     fontsize=9, loc="left")
    for ax in axes:
        ax.set_ylabel("MIDI pitch")
    axes[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
