#!/usr/bin/env python3
"""Long-file check and cost of separating long audio through the ``Separator`` interface.

    python bench/long_file.py --model <model folder> [--data ../shared/data/LibriSpeech]
                              [--minutes 10] [--paper_config] [--file_rate 16000]

1. **Speaker swaps on real speech.** Two tracks of continuous real speech: the utterances of two
   speakers (``--speakers a,b``), or else of the held-out speaker groups of the recipe's split
   (track A: the test speakers, track B: the validation speakers). Each is played in a new order
   until it is long enough, every utterance at the same RMS; they are mixed at 0 dB and written
   as one WAV file. ``separate_file``
   separates it (chunks of ``chunk_seconds`` with ``overlap_seconds``, sources aligned between
   chunks). The output channel assigned to each track on the whole file is kept fixed, and the
   SI-SNRi of that channel is printed minute by minute; every 10-s window whose best assignment
   differs from the file's is counted as a swap.
2. **Time and peak memory** of ``separate_file`` on that file with the trained model and, with
   ``--paper_config``, with Conv-TasNet's paper configuration (random weights: cost does not
   depend on them), each in a fresh process; the paper configuration is also run without
   chunking on 1 minute, to show what chunking saves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

from measure import rss_mb as peak_rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules.data.audio import read_audio, resample  # noqa: E402
from modules.data.corpora import scan_corpus, split_speakers  # noqa: E402
from modules.models.losses import si_snr  # noqa: E402

PAPER_YAML = os.path.join(ROOT, "hparams", "convtasnet.yaml")


def paper_folder(folder, extra=""):
    """Model folder of Conv-TasNet's paper configuration with random weights."""
    from modules.models.convtasnet import ConvTasNet

    os.makedirs(folder)
    torch.manual_seed(0)
    torch.save(ConvTasNet().state_dict(), os.path.join(folder, "model.ckpt"))
    with open(PAPER_YAML) as f:
        open(os.path.join(folder, "hyperparams.yaml"), "w").write(f.read() + extra)
    return folder


def build_tracks(data, sr, seconds, speakers=None, speaker_pattern=None, seed=1234):
    """Two tracks of ``seconds`` of continuous speech: the utterances of ``speakers`` (two
    names), or else of the held-out (test / valid) speaker groups of the recipe's split."""
    utts, _ = scan_corpus(data, speaker_pattern)
    if speakers:
        groups = [(f"speaker {s}", [u for u in utts if u.speaker == s]) for s in speakers]
    else:
        split = split_speakers([u.speaker for u in utts], 0.1, 0.1, seed, min_per_split=2)
        groups = [(f"{len(split[p])} {p} speakers", [u for u in utts if u.speaker in set(split[p])])
                  for p in ("test", "valid")]
    rng = np.random.default_rng(seed)
    tracks = []
    for name, group in groups:
        if not group:
            raise SystemExit(f"no utterances for {name} under {data}")
        signals = []
        for u in group:
            x, file_sr = read_audio(u.path)
            x = resample(x, file_sr, sr)
            signals.append(0.05 * x / x.pow(2).mean().sqrt().clamp_min(1e-8))
        pieces, total = [], 0
        while total < seconds * sr:
            for i in rng.permutation(len(signals)):
                pieces.append(signals[i])
                total += len(signals[i])
        tracks.append(torch.cat(pieces)[: int(seconds * sr)])
        print(f"track {'AB'[len(tracks) - 1]}: {name}, {len(group)} utterances, "
              f"{sum(u.seconds for u in group) / 60:.1f} min of distinct speech, looped to "
              f"{seconds / 60:.1f} min")
    return torch.stack(tracks, 1)  # [time, 2]


def measure(model_folder, wav, savedir):
    """Separate ``wav`` in this process; print a JSON line with time, memory and the outputs."""
    from modules.serving.inference import Separator

    sep = Separator.from_hparams(source=model_folder, savedir=savedir)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    before = peak_rss_mb()
    t0 = time.perf_counter()
    est = sep.separate_file(wav)[0]
    seconds = time.perf_counter() - t0
    out = wav + ".est.pt"
    torch.save(est, out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "rss_before_mb": before, "est": out}))


def run_measure(model_folder, wav, savedir):
    cmd = [sys.executable, __file__, "--_measure", model_folder, wav, savedir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_window(est, ref, mix, sr, window):
    """SI-SNRi of est[:, perm] vs ref per window, with the file-level assignment ``perm``."""
    n_src = ref.shape[1]
    pair = torch.stack([torch.stack([si_snr(est[:, i], ref[:, j]) for j in range(n_src)])
                        for i in range(n_src)])  # [est, ref]
    perm = [int(pair[:, j].argmax()) for j in range(n_src)]  # output channel of each track
    rows = []
    for start in range(0, ref.shape[0] - window // 2, window):
        seg = slice(start, min(start + window, ref.shape[0]))
        r, e, m = ref[seg], est[seg], mix[seg]
        gains = [float(si_snr(e[:, perm[j]], r[:, j]) - si_snr(m, r[:, j])) for j in range(n_src)]
        best = [int(torch.stack([si_snr(e[:, i], r[:, j]) for i in range(n_src)]).argmax())
                for j in range(n_src)]
        rows.append((start / sr, gains, best != perm))
    return perm, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=False, help="trained model folder (hyperparams.yaml + model.ckpt)")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "LibriSpeech"))
    p.add_argument("--speakers", default=None,
                   help="two speaker names 'a,b': track A/B = their utterances (default: the "
                        "held-out speaker groups of the recipe's split)")
    p.add_argument("--speaker_pattern", default=None, help="regex, first group = speaker")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--file_rate", type=int, default=None,
                   help="write the mixture file at this rate (default: the model's); "
                        "separate_file resamples it to the model's rate")
    p.add_argument("--paper_config", action="store_true",
                   help="also time Conv-TasNet's paper configuration (random weights)")
    p.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._measure:
        measure(*a._measure)
        return 0
    if not a.model:
        p.error("--model is required")
    work = tempfile.mkdtemp(prefix="long_file_")
    sr = int(__import__("yaml").safe_load(
        "\n".join(l for l in open(os.path.join(a.model, "hyperparams.yaml")) if l.startswith("sample_rate:"))
    )["sample_rate"])
    seconds = a.minutes * 60
    ref = build_tracks(a.data, sr, seconds, a.speakers.split(",") if a.speakers else None,
                       a.speaker_pattern)
    mix = ref.sum(1)
    wav = os.path.join(work, "mixture.wav")
    file_rate = a.file_rate or sr
    sf.write(wav, resample(mix.unsqueeze(0), sr, file_rate)[0].numpy(), file_rate, subtype="FLOAT")
    print(f"mixture: {wav} ({seconds / 60:.1f} min at {file_rate} Hz; model at {sr} Hz)\n")

    r = run_measure(os.path.abspath(a.model), wav, os.path.join(work, "model"))
    est = torch.load(r["est"], weights_only=True)
    perm, minutes = per_window(est, ref, mix, sr, 60 * sr)
    _, windows = per_window(est, ref, mix, sr, 10 * sr)
    print(f"trained model {a.model}: output channel of track A = {perm[0] + 1}, "
          f"of track B = {perm[1] + 1} (whole file)")
    print("minute  SI-SNRi track A (dB)  SI-SNRi track B (dB)  best assignment = file's")
    for start, gains, swapped in minutes:
        print(f"{start / 60:6.0f}  {gains[0]:20.2f}  {gains[1]:20.2f}  {'NO (swap)' if swapped else 'yes'}")
    swaps = sum(s for _, _, s in windows)
    print(f"10-s windows whose best assignment differs from the file's: {swaps} of {len(windows)}")
    print(f"min per-minute SI-SNRi: {min(min(g) for _, g, _ in minutes):.2f} dB; "
          f"mean over the file: {np.mean([g for _, g, _ in minutes]):.2f} dB\n")

    rows = [("trained model", a.minutes, "chunked", r)]
    if a.paper_config:
        paper = paper_folder(os.path.join(work, "paper"))
        rows.append(("Conv-TasNet paper config", a.minutes, "chunked",
                     run_measure(paper, wav, os.path.join(work, "p1"))))
        one = os.path.join(work, "one_minute.wav")
        sf.write(one, mix[: 60 * sr].numpy(), sr, subtype="FLOAT")
        rows.append(("Conv-TasNet paper config", 1, "chunked", run_measure(paper, one, os.path.join(work, "p2"))))
        whole = paper_folder(os.path.join(work, "paper_whole"), "chunk_seconds: 100000\n")
        rows.append(("Conv-TasNet paper config", 1, "whole file",
                     run_measure(whole, one, os.path.join(work, "p3"))))
    print(f"{'model':26s} {'audio':>7s} {'mode':>10s} {'time (s)':>9s} {'RTF':>6s} "
          f"{'peak RSS (MB)':>14s} {'of which separation':>20s}")
    for name, minutes_, mode, m in rows:
        print(f"{name:26s} {minutes_:5.1f} m {mode:>10s} {m['seconds']:9.1f} "
              f"{m['seconds'] / (60 * minutes_):6.3f} {m['peak_rss_mb']:14.0f} "
              f"{m['peak_rss_mb'] - m['rss_before_mb']:20.0f}")
    print(f"({torch.get_num_threads()} threads; chunk_seconds / overlap_seconds from each model's "
          "hyperparams.yaml, default 10 / 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
