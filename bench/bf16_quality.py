#!/usr/bin/env python3
"""What bf16 inference costs in quality: a trained separation folder run in fp32 and in bf16.

    python bench/bf16_quality.py --model <separation folder> [--data ../shared/data/LibriSpeech]
                                 [--mixtures 20] [--seconds 4]

Mixtures of two test speakers of the recipe's split (0 dB, ``--seconds`` long, drawn with a fixed
seed) are separated through ``Separator`` with ``precision`` fp32 and bf16 (``torch.autocast``
in bfloat16, outputs float32). Printed per precision: the mean SI-SNRi against the references,
and for bf16 the SNR of its output to the fp32 output (mean and worst over mixtures and
sources), with the time per mixture.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from long_file import build_tracks  # noqa: E402
from modules.data.corpora import scan_corpus, split_speakers  # noqa: E402
from modules.models.losses import pit_si_snr, si_snr  # noqa: E402
from modules.serving.inference import Separator  # noqa: E402


def snr_db(est: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (est - ref).pow(2).sum().clamp_min(1e-20)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "LibriSpeech"))
    p.add_argument("--mixtures", type=int, default=20)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--speaker_pattern", default=None)
    a = p.parse_args(argv)
    seps = {prec: Separator.from_hparams(source=a.model, savedir=os.path.join("/tmp", f"bf16q_{prec}"),
                                         overrides={"precision": prec}) for prec in ("fp32", "bf16")}
    sr = seps["fp32"].sample_rate
    utts, _ = scan_corpus(a.data, a.speaker_pattern)
    test = sorted(split_speakers([u.speaker for u in utts], 0.1, 0.1, 1234, min_per_split=2)["test"])
    rng = np.random.default_rng(0)
    gains = {"fp32": [], "bf16": []}
    times = {"fp32": [], "bf16": []}
    snrs = []
    for k in range(a.mixtures):
        pair = list(rng.choice(test, 2, replace=False))
        ref = build_tracks(a.data, sr, a.seconds, pair, a.speaker_pattern, seed=k, quiet=True)
        mix = ref.sum(1)
        base = float(torch.stack([si_snr(mix, ref[:, j]) for j in range(2)]).mean())
        out = {}
        for prec, sep in seps.items():
            t0 = time.perf_counter()
            out[prec] = sep.separate_batch(mix[None])
            times[prec].append(time.perf_counter() - t0)
            gains[prec].append(float(pit_si_snr(out[prec], ref[None])[0][0]) - base)
        snrs += [snr_db(out["bf16"][0, :, j], out["fp32"][0, :, j]) for j in range(2)]
    print(f"{a.mixtures} mixtures of {a.seconds:g} s, 2 test speakers each, {a.model}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'precision':>9s} {'SI-SNRi (dB)':>13s} {'SNR to fp32 (dB): mean':>23s} {'worst':>6s} "
          f"{'s per mixture':>14s}")
    for prec in ("fp32", "bf16"):
        snr = f"{np.mean(snrs):23.1f} {min(snrs):6.1f}" if prec == "bf16" else f"{'':23s} {'':6s}"
        print(f"{prec:>9s} {np.mean(gains[prec]):13.2f} {snr} {np.median(times[prec]):14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
