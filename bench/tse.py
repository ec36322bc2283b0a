#!/usr/bin/env python3
"""Compute of the two target-speaker extraction models with WavLM-base dimensions, side by side.

    python bench/tse.py [--enroll 3] [--mix 4,16] [--threads 2] [--repeats 2] [--no_train]

Both models are built from their recipe yamls (``recipes/target_speaker/hparams/wavlm_tasnet.yaml``
and ``wavlm_dynamic_tasnet.yaml``, 16 kHz) around a randomly initialised WavLM with the
dimensions of WavLM Base (12 layers, 768 wide, ``transformers.WavLMConfig()``; no weights are
downloaded), frozen as in the yamls. For each mixture length, with an enrolment of ``--enroll``
seconds and batch 1:

* inference: ``model(mix, enroll)`` under ``torch.inference_mode`` (best of ``--repeats``);
* training step: forward + SI-SDR loss + backward (the trained parts: fusion / QKb, TCN, mask,
  encoder and decoder; WavLM frozen).

``WavLMTasNet`` runs WavLM twice (mixture, enrolment); ``WavLMDynamicTasNet`` once over
``[enrolment | 1 s silence | mixture]`` (its first layers on the whole sequence, the rest on the
mixture frames only). Every measurement runs in a fresh process: time and peak resident memory
(``ru_maxrss``, absolute and above the state after a warm-up run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from measure import parse_args_or_run_child, run_child, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000
MODELS = {"WavLMTasNet": "wavlm_tasnet.yaml", "WavLMDynamicTasNet": "wavlm_dynamic_tasnet.yaml"}


def build(name: str, wavlm_folder: str):
    """The recipe yaml's model, around the WavLM of ``wavlm_folder``."""
    from hyperpyyaml import load_hyperpyyaml

    path = os.path.join(ROOT, "recipes", "target_speaker", "hparams", MODELS[name])
    with open(path) as f:
        hparams = load_hyperpyyaml(f, {"wavlm_source": wavlm_folder, "sample_rate": SR})
    return hparams["model"]


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, ROOT)
    from modules.models.losses import si_snr

    model = build(spec["model"], spec["wavlm"])
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(1, int(spec["mix"] * SR), generator=gen)
    enroll = torch.randn(1, int(spec["enroll"] * SR), generator=gen)
    target = torch.randn(mix.shape, generator=gen)
    if spec["task"] == "infer":
        model.eval()

        def run(mix, target):
            with torch.inference_mode():
                model(mix, enroll)
    else:
        model.train()

        def run(mix, target):
            loss = -si_snr(model(mix, enroll), target).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

    run(mix[:, :SR], target[:, :SR])  # warm-up on 1 s: oneDNN primitives, allocator
    return timed(lambda: run(mix, target), spec["repeats"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enroll", type=float, default=3.0, help="enrolment seconds")
    parser.add_argument("--mix", default="4,16", help="mixture seconds, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no_train", action="store_true", help="inference only")
    args = parse_args_or_run_child(parser, argv, child)
    if args is None:
        return

    from transformers import WavLMConfig, WavLMModel

    folder = tempfile.mkdtemp(prefix="bench_tse_wavlm_")
    WavLMModel(WavLMConfig()).save_pretrained(folder)  # WavLM Base dimensions, random weights
    mixes = [float(s) for s in args.mix.split(",") if s]
    tasks = ["infer"] + ([] if args.no_train else ["train"])
    rows = []
    for task in tasks:
        for mix in mixes:
            row = {"task": task, "mix": mix}
            for name in MODELS:
                spec = dict(model=name, wavlm=folder, task=task, mix=mix, enroll=args.enroll,
                            threads=args.threads, repeats=args.repeats)
                print(f"  {name:19s} {task} {args.enroll:g} s + {mix:g} s ...", end=" ", flush=True)
                row[name] = run_child(__file__, spec)
                r = row[name]
                print(r.get("error") or f"{r['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB", flush=True)
            rows.append(row)

    import torch

    print(f"\nWavLM-base dimensions (random weights, frozen), batch 1, enrolment {args.enroll:g} s, "
          f"{SR} Hz, {args.threads} threads, torch {torch.__version__}\n")
    print("| task | mixture | WavLMTasNet s | WavLMDynamicTasNet s | dynamic / two-pass time | "
          "WavLMTasNet peak / work MB | WavLMDynamicTasNet peak / work MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["WavLMTasNet"], r["WavLMDynamicTasNet"]
        ok = "error" not in a and "error" not in b
        t = lambda m: m.get("error", "failed")[:40] if "error" in m else f"{m['seconds']:.2f}"  # noqa: E731
        mem = lambda m: "failed" if "error" in m else f"{m['peak_mb']:.0f} / {m['work_mb']:.0f}"  # noqa: E731
        ratio = f"{b['seconds'] / a['seconds']:.2f}" if ok else "-"
        label = "inference" if r["task"] == "infer" else "train step (fwd + bwd)"
        print(f"| {label} | {r['mix']:g} s | {t(a)} | {t(b)} | {ratio} | {mem(a)} | {mem(b)} |")


if __name__ == "__main__":
    main()
