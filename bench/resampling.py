#!/usr/bin/env python3
"""Cost of a training mixture when the corpus is not at the model's rate.

    python bench/resampling.py [--data ../shared/data/LibriSpeech] [--files 24] [--items 20]
                               [--segment_seconds 2 4] [--model_rates 16000 8000]
                               [--file_rates 16000 44100 48000] [--threads 1] [--one_step 2]

Copies of ``--files`` LibriSpeech utterances (one per speaker) are written at each of
``--file_rates`` (FLAC, in a temporary folder that is removed afterwards), and the separation
data of each copy (:class:`modules.data.mixing.SeparationData`, 2 speakers, speed perturbation
0.9-1.1 as in the recipes) renders ``--items`` training mixtures per epoch for 3 epochs. Printed
per mixture (two source crops): the first epoch, which resamples each file it meets once to the
model rate (:class:`modules.data.resampled.ModelRateAudio`), and the later epochs, which only
read and speed-perturb crops; and the ratio of the later epochs to those of the first of
``--file_rates`` (16 kHz, LibriSpeech's own rate).

``--one_step N`` also times N mixtures the way this pipeline used to render them: each crop
read at the file's rate and resampled once with the speed folded into the ratio
(``file_rate * speed`` to ``model_rate * 100``).

Threads: 1 by default, as in a data-loader worker (PyTorch gives each worker one thread).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

from measure import rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules.data.audio import read_audio, resample  # noqa: E402
from modules.data.corpora import scan_corpus  # noqa: E402
from modules.data.mixing import READ_MARGIN, SeparationData  # noqa: E402


def write_copies(src: str, n_files: int, rates, folder: str) -> dict:
    """``{rate: corpus folder}``: the first ``n_files`` utterances of ``src`` at each rate, one
    folder per speaker."""
    utts, _ = scan_corpus(src)
    chosen = sorted(utts, key=lambda u: u.id)[:n_files]
    out = {}
    for rate in rates:
        out[rate] = os.path.join(folder, f"corpus_{rate}")
        for u in chosen:
            x, sr = read_audio(u.path)
            path = os.path.join(out[rate], u.speaker, f"{u.id}.flac")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sf.write(path, resample(x, sr, rate).clamp(-1, 1).numpy(), rate)
    return out


def folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / 1e6


def time_items(train, n: int) -> float:
    """Mean seconds per item of ``train[0..n)``."""
    start = time.perf_counter()
    for i in range(n):
        train[i]
    return (time.perf_counter() - start) / n


def one_step_item(spec, utts, model_rate: int):
    """A mixture's sources rendered as before: one resampling per crop, speed folded in."""
    for uid, start, speed in zip(spec.utts, spec.starts, spec.speeds):
        u = utts[uid]
        need = math.ceil(spec.length * u.sample_rate * speed / (100 * model_rate)) + READ_MARGIN
        x, sr = read_audio(u.path, start=start, stop=min(u.frames, start + need))
        resample(x, sr * speed, model_rate * 100)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "LibriSpeech"))
    p.add_argument("--files", type=int, default=24)
    p.add_argument("--items", type=int, default=20, help="training mixtures per epoch")
    p.add_argument("--segment_seconds", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--model_rates", type=int, nargs="+", default=[16000, 8000])
    p.add_argument("--file_rates", type=int, nargs="+", default=[16000, 44100, 48000])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one_step", type=int, default=0,
                   help="also time this many mixtures rendered the old way (slow, GBs at 44.1 kHz)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.files} LibriSpeech files, {a.items} training mixtures of 2 speakers per epoch, "
          f"3 epochs, {a.threads} thread(s)")
    header = (f"{'file Hz':>8} {'model Hz':>8} {'crop s':>6} {'1st epoch ms':>12} "
              f"{'later ms':>9} {'x 1st rate':>11} {'cache MB':>8}")
    if a.one_step:
        header += f" {'one-step ms':>11} {'peak RSS MB':>11}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        corpora = write_copies(a.data, a.files, a.file_rates, tmp)
        for model_rate in a.model_rates:
            for seg in a.segment_seconds:
                base = None
                for file_rate in a.file_rates:
                    name = f"{file_rate}_{model_rate}_{seg}"
                    data = SeparationData(corpora[file_rate], save_folder=os.path.join(tmp, "save", name),
                                          cache_folder=os.path.join(tmp, "cache", name),
                                          sample_rate=model_rate, segment_seconds=seg,
                                          train_mixtures_per_epoch=a.items, n_valid=1, n_test=1)
                    train = data.datasets()["train"]
                    train.set_epoch(0)
                    first = time_items(train, a.items)
                    later = []
                    for epoch in (1, 2):
                        train.set_epoch(epoch)
                        later.append(time_items(train, a.items))
                    later = float(np.mean(later))
                    base = base or later
                    row = (f"{file_rate:8d} {model_rate:8d} {seg:6.1f} {1e3 * first:12.1f} "
                           f"{1e3 * later:9.1f} {later / base:11.2f} {folder_mb(os.path.join(tmp, 'cache', name)):8.1f}")
                    if a.one_step:
                        start = time.perf_counter()
                        for i in range(a.one_step):
                            one_step_item(train.spec(i), train.utts, model_rate)
                        row += f" {1e3 * (time.perf_counter() - start) / a.one_step:11.1f} {rss_mb():11.0f}"
                    print(row, flush=True)


if __name__ == "__main__":
    main()
