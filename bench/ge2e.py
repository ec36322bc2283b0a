#!/usr/bin/env python3
"""The GE2E d-vector encoder (``modules.models.speaker.GE2EEncoder``) on real speech.

    python bench/ge2e.py [--speakers 50] [--utts 8] [--files 20]

Prints two tables:

1. agreement with resemblyzer 0.1.4's own ``VoiceEncoder`` (needs librosa and webrtcvad), on
   ``--files`` utterances each of the LibriSpeech excerpt and speechocean762, of our encoder
   with the package's level rule (``volume="increase", target_dbfs=-30``): the largest absolute
   difference and the lowest and mean cosine between the embeddings, for (a) 16 kHz input and
   the package's volume normalisation, (b) 8 kHz input (the package resamples with librosa),
   (c) the package's full ``preprocess_wav``, whose webrtcvad silence trim we do not reproduce,
   and (d) as (c) with our energy-based trim (``trim_silence_db=30``);
2. speaker discrimination on speechocean762 (``--speakers`` speakers, every k-th folder, first
   ``--utts`` utterances each, all different sentences): mean cosine of same-speaker and of
   different-speaker pairs, closed-set identification of every utterance but the first by the
   first utterances, and the same identification with every utterance but the first 20 times
   louder (an estimate at another level than its enrolment).
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import soundfile as sf
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def read(path):
    return sf.read(path, dtype="float32")[0]


def agreement(enc, enc8, enc_trim, ref, files):
    import librosa
    from resemblyzer import preprocess_wav
    from resemblyzer.audio import normalize_volume

    from modules.data.audio import resample

    rows = {"16 kHz": [], "8 kHz": [], "package with VAD trim": [], "ours with energy trim": []}
    for f in files:
        x = read(f)
        ours = enc(torch.from_numpy(x))[0].numpy()
        a = ref.embed_utterance(normalize_volume(x, -30, increase_only=True))
        rows["16 kHz"].append((np.abs(ours - a).max(), ours @ a))
        x8 = resample(torch.from_numpy(x), 16000, 8000)
        ours8 = enc8(x8)[0].numpy()
        up = librosa.resample(x8.numpy(), orig_sr=8000, target_sr=16000)
        b = ref.embed_utterance(normalize_volume(up, -30, increase_only=True))
        rows["8 kHz"].append((np.abs(ours8 - b).max(), ours8 @ b))
        c = ref.embed_utterance(preprocess_wav(x, 16000))
        rows["package with VAD trim"].append((np.abs(ours - c).max(), ours @ c))
        trimmed = enc_trim(torch.from_numpy(x))[0].numpy()
        rows["ours with energy trim"].append((np.abs(trimmed - c).max(), trimmed @ c))
    return {k: (max(r[0] for r in v), min(r[1] for r in v), float(np.mean([r[1] for r in v])))
            for k, v in rows.items()}


def discrimination(embed, speakers, utts, gain=1.0):
    e, lab = [], []
    for s in speakers:
        for k, f in enumerate(sorted(glob.glob(os.path.join(DATA, "speechocean762", s, "*.flac")))[:utts]):
            e.append(embed(read(f) * (gain if k else 1.0)))
            lab.append(s)
    e, lab = np.stack(e), np.array(lab)
    cos = e @ e.T
    same, off = lab[:, None] == lab[None], ~np.eye(len(lab), dtype=bool)
    first = np.array([i for i in range(len(lab)) if i == 0 or lab[i] != lab[i - 1]])
    rest = np.setdiff1d(np.arange(len(lab)), first)
    ident = np.mean(lab[first][np.argmax(cos[rest][:, first], 1)] == lab[rest])
    return cos[same & off].mean(), cos[~same].mean(), ident


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speakers", type=int, default=50)
    p.add_argument("--utts", type=int, default=8)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from resemblyzer import VoiceEncoder, preprocess_wav

    from modules.models.speaker import GE2EEncoder

    package_rule = dict(cache_size=0, volume="increase", target_dbfs=-30)
    enc, enc8 = GE2EEncoder(**package_rule), GE2EEncoder(sample_rate=8000, **package_rule)
    enc_trim = GE2EEncoder(trim_silence_db=30, **package_rule)
    default = GE2EEncoder(cache_size=0)
    ref = VoiceEncoder("cpu", verbose=False)
    files = {
        "LibriSpeech": sorted(glob.glob(os.path.join(DATA, "LibriSpeech", "train-clean-100", "*", "*",
                                                     "*.flac")))[:args.files],
        "speechocean762": sorted(glob.glob(os.path.join(DATA, "speechocean762", "*", "*.flac")))[
            ::8][:args.files]}
    print("| corpus | input | max abs diff | min cosine | mean cosine |")
    print("|---|---|---|---|---|")
    for corpus, fs in files.items():
        for k, (d, c, m) in agreement(enc, enc8, enc_trim, ref, fs).items():
            print(f"| {corpus} ({len(fs)} files) | {k} | {d:.2e} | {c:.6f} | {m:.6f} |")

    root = os.path.join(DATA, "speechocean762")
    speakers = sorted(d for d in os.listdir(root) if d.isdigit())
    speakers = speakers[::max(1, len(speakers) // args.speakers)][:args.speakers]
    print(f"\nspeechocean762, {len(speakers)} speakers x {args.utts} utterances")
    print("| encoder | same-speaker cosine | different-speaker cosine | identification | "
          "identification, others x20 |")
    print("|---|---|---|---|---|")
    for name, embed in (("GE2EEncoder() (level fixed at -25 dBFS)",
                         lambda x: default(torch.from_numpy(x))[0].numpy()),
                        ("GE2EEncoder(volume='increase', target_dbfs=-30)",
                         lambda x: enc(torch.from_numpy(x))[0].numpy()),
                        ("resemblyzer VoiceEncoder + preprocess_wav (VAD trim)",
                         lambda x: ref.embed_utterance(preprocess_wav(x, 16000)))):
        same, diff, ident = discrimination(embed, speakers, args.utts)
        loud = discrimination(embed, speakers, args.utts, gain=20.0)[2]
        print(f"| {name} | {same:.3f} | {diff:.3f} | {100 * ident:.1f} % | {100 * loud:.1f} % |")


if __name__ == "__main__":
    main()
