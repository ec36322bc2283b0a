#!/usr/bin/env python3
"""Long-file check and cost of separating long audio through the ``Separator`` interface.

    python bench/long_file.py --model <model folder> [--data ../shared/data/LibriSpeech]
                              [--speakers a,b | weakest] [--minutes 10] [--window 30]
                              [--paper_config] [--file_rate 16000]

1. **Speaker swaps on real speech.** Two tracks of continuous real speech: the utterances of two
   speakers (``--speakers a,b``; ``--speakers weakest``: one file for each of the ``--files``
   pairs of test speakers, among ``--pairs`` drawn at random, that the model separates worst on
   a 20-s probe while still gaining at least ``--min_gain`` (1 dB)), or else of the
   held-out speaker groups of the recipe's split (track A: the test speakers, track B: the
   validation speakers). Each is played in a new order until it is long enough, every utterance
   at the same RMS; they are mixed at 0 dB and written as one WAV file. ``separate_file``
   separates it in chunks (``chunk_seconds`` with ``overlap_seconds``) once per
   ``speaker_tracking`` (``overlap``: each chunk matched to the previous one; ``global``: GE2E
   embeddings over the whole file). The output channel assigned to each track on the whole file
   is kept fixed, and the SI-SNRi of that channel is printed minute by minute; every
   ``--window``-s window (default 30) whose best assignment differs from the file's is counted
   as a swap.
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
from modules.models.losses import best_permutation, si_snr  # noqa: E402

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


def build_tracks(data, sr, seconds, speakers=None, speaker_pattern=None, seed=1234, quiet=False):
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
        if not quiet:
            print(f"track {'AB'[len(tracks) - 1]}: {name}, {len(group)} utterances, "
                  f"{sum(u.seconds for u in group) / 60:.1f} min of distinct speech, looped to "
                  f"{seconds / 60:.1f} min")
    return torch.stack(tracks, 1)  # [time, 2]


def weakest_pairs(model_folder, data, sr, pairs, speaker_pattern, work, n=1, probe_seconds=20,
                  seed=0, min_gain=1.0):
    """Of ``pairs`` random pairs of test speakers, the ``n`` the model separates worst (lowest
    SI-SNRi on ``probe_seconds`` of their speech mixed at 0 dB) among those it separates at all
    (at least ``min_gain`` dB: on a pair it does not separate, no assignment is right)."""
    from modules.models.losses import pit_si_snr
    from modules.serving.inference import Separator

    utts, _ = scan_corpus(data, speaker_pattern)
    test = sorted(split_speakers([u.speaker for u in utts], 0.1, 0.1, 1234, min_per_split=2)["test"])
    rng = np.random.default_rng(seed)
    candidates = {tuple(sorted(rng.choice(test, 2, replace=False))) for _ in range(pairs)}
    sep = Separator.from_hparams(source=model_folder, savedir=os.path.join(work, "probe"))
    scores = {}
    for pair in sorted(candidates):
        ref = build_tracks(data, sr, probe_seconds, list(pair), speaker_pattern, quiet=True)
        mix = ref.sum(1)
        est = sep.separate_batch(mix[None])
        base = float(torch.stack([si_snr(mix, ref[:, j]) for j in range(2)]).mean())
        scores[pair] = float(pit_si_snr(est, ref[None])[0][0]) - base
    separated = sorted((v, k) for k, v in scores.items() if v >= min_gain)
    if not separated:
        raise SystemExit(f"the model separates none of the {len(scores)} pairs by {min_gain} dB "
                         f"(best {max(scores.values()):.2f} dB): no swap count would mean anything")
    print(f"SI-SNRi of {len(scores)} test-speaker pairs on {probe_seconds} s: "
          + ", ".join(f"{v:.1f}" for v in sorted(scores.values())))
    chosen = separated[:n]
    print(f"the {len(chosen)} weakest pairs the model separates (>= {min_gain} dB): "
          + ", ".join(f"{a}+{b} ({v:.2f} dB)" for v, (a, b) in chosen))
    return [list(pair) for _, pair in chosen]


def measure(model_folder, wav, savedir, tracking="global"):
    """Separate ``wav`` in this process; print a JSON line with time, memory and the outputs."""
    from modules.serving.inference import Separator

    sep = Separator.from_hparams(source=model_folder, savedir=savedir,
                                 overrides={"speaker_tracking": tracking})
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    before = peak_rss_mb()
    t0 = time.perf_counter()
    est = sep.separate_file(wav)[0]
    seconds = time.perf_counter() - t0
    out = wav + ".est.pt"
    torch.save(est, out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "rss_before_mb": before, "est": out}))


def run_measure(model_folder, wav, savedir, tracking="global"):
    cmd = [sys.executable, __file__, "--_measure", model_folder, wav, savedir, tracking]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_window(est, ref, mix, sr, window):
    """SI-SNRi of est[:, perm] vs ref per window, with the file-level assignment ``perm``."""
    n_src = ref.shape[1]
    pair = torch.stack([torch.stack([si_snr(est[:, i], ref[:, j]) for j in range(n_src)])
                        for i in range(n_src)])  # [est, ref]
    # output channel of each track: the best one-to-one assignment on the whole file
    perm = [int(i) for i in best_permutation(pair[None])[0]]
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
    p.add_argument("--window", type=float, default=30.0, help="seconds per window of the swap count")
    p.add_argument("--pairs", type=int, default=20, help="candidate pairs of --speakers weakest")
    p.add_argument("--files", type=int, default=5, help="long files (weakest pairs) of --speakers weakest")
    p.add_argument("--min_gain", type=float, default=1.0,
                   help="--speakers weakest: only pairs the model separates by this much (dB)")
    p.add_argument("--file_rate", type=int, default=None,
                   help="write the mixture file at this rate (default: the model's); "
                        "separate_file resamples it to the model's rate")
    p.add_argument("--paper_config", action="store_true",
                   help="also time Conv-TasNet's paper configuration (random weights)")
    p.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)
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
    if a.speakers == "weakest":
        pairs = weakest_pairs(a.model, a.data, sr, a.pairs, a.speaker_pattern, work, a.files,
                              min_gain=a.min_gain)
    else:
        pairs = [a.speakers.split(",") if a.speakers else None]
    table = []
    for k, speakers in enumerate(pairs):
        ref = build_tracks(a.data, sr, seconds, speakers, a.speaker_pattern)
        mix = ref.sum(1)
        wav = os.path.join(work, f"mixture{k}.wav")
        file_rate = a.file_rate or sr
        sf.write(wav, resample(mix.unsqueeze(0), sr, file_rate)[0].numpy(), file_rate, subtype="FLOAT")
        print(f"mixture: {wav} ({seconds / 60:.1f} min at {file_rate} Hz; model at {sr} Hz)\n")
        for tracking in ("overlap", "global"):
            r = run_measure(os.path.abspath(a.model), wav, os.path.join(work, "model"), tracking)
            est = torch.load(r["est"], weights_only=True)
            perm, minutes = per_window(est, ref, mix, sr, 60 * sr)
            _, windows = per_window(est, ref, mix, sr, int(a.window * sr))
            swaps = sum(s for _, _, s in windows)
            mean = float(np.mean([g for _, g, _ in minutes]))
            table.append(("+".join(speakers) if speakers else "held-out groups", tracking, swaps,
                          len(windows), mean, r))
            print(f"speaker_tracking={tracking}: output channel of track A = {perm[0] + 1}, of track "
                  f"B = {perm[1] + 1} (whole file)")
            print("minute  SI-SNRi track A (dB)  SI-SNRi track B (dB)  best assignment = file's")
            for start, gains, swapped in minutes:
                print(f"{start / 60:6.0f}  {gains[0]:20.2f}  {gains[1]:20.2f}  "
                      f"{'NO (swap)' if swapped else 'yes'}")
            print(f"{a.window:g}-s windows whose best assignment differs from the file's: {swaps} of "
                  f"{len(windows)}; mean SI-SNRi over the file: {mean:.2f} dB\n")
    print(f"{'speakers':18s} {'speaker_tracking':>16s} {'swapped windows':>16s} "
          f"{'mean SI-SNRi (dB)':>18s} {'time (s)':>9s}")
    for name, tracking, swaps, n, mean, r in table:
        print(f"{name:18s} {tracking:>16s} {f'{swaps} of {n}':>16s} {mean:18.2f} {r['seconds']:9.1f}")
    for tracking in ("overlap", "global"):
        rows = [t for t in table if t[1] == tracking]
        print(f"{'all files':18s} {tracking:>16s} {f'{sum(t[2] for t in rows)} of {sum(t[3] for t in rows)}':>16s}")
    print()
    r = table[-1][-1]
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
