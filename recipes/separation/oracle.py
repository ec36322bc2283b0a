#!/usr/bin/env python3
"""Score oracle masks (ideal binary and ideal ratio) on a recipe's test mixtures.

Usage (same yaml and overrides as train.py, so the test mixtures are the same)::

    python recipes/separation/oracle.py recipes/separation/hparams/convtasnet-small.yaml \
        --data_folder=../shared/data/LibriSpeech [--n_fft=256 --hop_length=64]

Writes ``oracle_results.csv`` (``snt_id, mask, si-snr, si-snr_i, sdr, sdr_i``) and
``oracle_summary.json`` into ``<output_folder>/oracle`` and prints the means. The masks are
computed from the reference sources and applied to the mixture STFT with the mixture phase, so
they bound what an STFT magnitude-mask model can reach at that resolution.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from modules.training.metrics import METRIC_NAMES, separation_metrics  # noqa: E402
from modules.models.stft_mask import ideal_mask_separation  # noqa: E402

MASKS = ("ibm", "irm")


def run(argv=None):
    hparams_file, _, overrides = sb.parse_arguments(argv if argv is not None else sys.argv[1:])
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    n_fft = hparams.get("n_fft", 256)
    hop = hparams.get("hop_length", n_fft // 4)
    test = hparams["data"].datasets()["test"]
    rows = []
    for i in tqdm(range(len(test)), desc="oracle masks", unit="mix"):
        item = test[i]
        for kind in MASKS:
            est = ideal_mask_separation(item["mix"], item["sources"], kind, n_fft, hop)
            m, _ = separation_metrics(item["mix"], est, item["sources"])
            rows.append({"snt_id": item["id"], "mask": kind, **m})
    out = os.path.join(hparams["output_folder"], "oracle")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "oracle_results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["snt_id", "mask", *METRIC_NAMES])
        w.writeheader()
        w.writerows(rows)
    summary = {"n_mixtures": len(test), "n_fft": n_fft, "hop_length": hop,
               "sample_rate": hparams["sample_rate"], "data_folder": hparams["data_folder"]}
    for kind in MASKS:
        sel = [r for r in rows if r["mask"] == kind]
        summary[kind] = {k: sum(r[k] for r in sel) / len(sel) for k in METRIC_NAMES}
    with open(os.path.join(out, "oracle_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"oracle masks on {len(test)} test mixtures (STFT {n_fft}/{hop} at "
          f"{hparams['sample_rate']} Hz):")
    for kind in MASKS:
        s = summary[kind]
        print(f"  {kind.upper()}: SI-SNRi {s['si-snr_i']:6.2f} dB  SDRi {s['sdr_i']:6.2f} dB  "
              f"(SI-SNR {s['si-snr']:.2f}, SDR {s['sdr']:.2f})")
    print(f"  per-mixture results: {os.path.abspath(out)}/oracle_results.csv")
    return summary


if __name__ == "__main__":
    run()
