"""Data-validation report of a separation or extraction corpus, and its command line.

    python -m modules.data.report ../shared/data/LibriSpeech [--n_src 3] [--speaker_pattern ...]
    python -m modules.data.report ../shared/data/LibriSpeech ../shared/data/speechocean762 --tse

It lists, per split, the utterances, speakers, durations and sample rates of a single-speaker
corpus (or the mixtures of a published one), the achieved-vs-requested SNR of the generated
mixtures, the enrolments of extraction data, and every unreadable file or missing entry.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from modules.data.audio import audio_info, read_audio
from modules.data.corpora import SPLITS, CorpusKind
from modules.data.enrolment import TSEData, enroll_gap
from modules.data.mixing import SeparationData, achieved_snrs, render_mixture


def _n_items(ds, split: str, n_train_samples: int) -> int:
    """Items of ``split`` to look at: all of a fixed set, ``n_train_samples`` of training."""
    return min(len(ds), n_train_samples) if split == "train" else len(ds)


def _generated_lines(data: SeparationData, sets: dict, n_train_samples: int) -> list:
    by_split = {s: list(sets[s].utts.values()) for s in SPLITS}  # no second scan
    lines = []
    if len(data.corpora) > 1:
        lines.append("corpora: " + ", ".join(
            f"{name} ({len({u.speaker for u in us})} speakers, {len(us)} utts)"
            for name, us in data.corpora.items()))
    lines.append(f"{'split':6} {'speakers':>8} {'utts':>6} {'hours':>7} {'min s':>6} "
                 f"{'mean s':>6} {'max s':>6}  sample rates")
    for s in SPLITS:
        us = by_split[s]
        secs = np.array([u.seconds for u in us])
        rates = sorted({u.sample_rate for u in us})
        lines.append(f"{s:6} {len({u.speaker for u in us}):8d} {len(us):6d} "
                     f"{secs.sum() / 3600:7.3f} {secs.min():6.2f} {secs.mean():6.2f} "
                     f"{secs.max():6.2f}  {rates}")
    lines.append("mixtures: requested vs achieved source-to-source SNR")
    for s in SPLITS:
        ds = sets[s]
        n = _n_items(ds, s, n_train_samples)
        errs, lens = [], []
        for i in range(n):
            spec = ds.spec(i)
            _, src = render_mixture(spec, ds.utts, data.sample_rate, ds.audio)
            errs += [abs(a - r) for a, r in zip(achieved_snrs(src)[1:], spec.snrs_db[1:])]
            lens.append(spec.length / data.sample_rate)
        lines.append(f"  {s:6} {n:5d} mixtures, {np.mean(lens):5.2f} s mean; |SNR error| "
                     f"mean {np.mean(errs):.2e} dB, max {np.max(errs):.2e} dB")
    return lines


def _published_lines(sets: dict, n_train_samples: int) -> list:
    lines = [f"{'split':6} {'mixtures':>8} {'hours':>7} {'mean s':>6}  sample rates  "
             "source-to-source SNR (dB, mean±std)"]
    for s in SPLITS:
        rows = sets[s].rows
        infos = [audio_info(r[1]) for r in rows]
        secs = np.array([f / sr for f, sr, _ in infos])
        snrs = []
        for r in rows[: min(len(rows), n_train_samples)]:
            srcs = torch.stack([read_audio(p)[0] for p in r[2]], -1)
            snrs += achieved_snrs(srcs)[1:]
        lines.append(f"{s:6} {len(rows):8d} {secs.sum() / 3600:7.3f} {secs.mean():6.2f}  "
                     f"{sorted({sr for _, sr, _ in infos})}  {np.mean(snrs):+.2f}±{np.std(snrs):.2f}")
    return lines


def separation_report(data: SeparationData, n_train_samples: int = 100) -> str:
    """Text report: utterances, speakers, durations, sample rates per split, and the
    achieved-vs-requested SNR error of generated mixtures (``n_train_samples`` of training)."""
    folders = ", ".join(data.folders) or "(synthetic speech-like corpus, NOT real speech)"
    lines = [f"data_folder: {folders}",
             f"corpus kind: {data.kind}; n_src={data.n_src}; target rate {data.sample_rate} Hz"]
    sets = data.datasets()
    if data.kind in (CorpusKind.SYNTHETIC, CorpusKind.SPEAKERS):
        lines += _generated_lines(data, sets, n_train_samples)
    else:
        lines += _published_lines(sets, n_train_samples)
    problems = data.unreadable + data.missing
    lines.append(f"unreadable files / missing entries: {len(problems)}")
    lines += [f"  {p}" for p in problems[:20]]
    return "\n".join(lines)


def _enrolment_lines(data: TSEData, n_train_samples: int) -> list:
    """Per split: how the enrolments were chosen, their lengths, and the shortest gap between an
    enrolment cut from the target's own utterance and the target crop (> 0: no overlap)."""
    lines = ["enrolments:"]
    sets = data.datasets()
    for s in SPLITS:
        ds = sets[s]
        specs = [ds.spec(i) for i in range(_n_items(ds, s, n_train_samples))]
        modes = {m: sum(sp.enroll_mode == m for sp in specs) for m in
                 sorted({sp.enroll_mode for sp in specs})}
        secs = np.array([sp.enroll_length / ds.utts[sp.enroll_utt].sample_rate for sp in specs])
        gaps = [enroll_gap(sp, ds.utts[sp.utts[0]], data.sample_rate) for sp in specs
                if sp.enroll_mode == "same-utterance"]
        gap = f"; closest to its target crop: {min(gaps)} samples" if gaps else ""
        lines.append(f"  {s:6} {len(specs):5d}: {modes}; {secs.mean():.2f} s mean "
                     f"({secs.min():.2f}-{secs.max():.2f}){gap}")
    return lines


def _list_lines(data: TSEData) -> list:
    """Per split of the TSE lists: rows, hours, enrolment lengths, rates, and the rows whose
    enrolment is the target file itself."""
    sets = data.datasets()
    lines = [f"tse_lists: {data.tse_lists}; target rate {data.sample_rate} Hz",
             f"{'split':6} {'rows':>6} {'mix hours':>9} {'enrol mean s':>12}  sample rates  "
             "enrolment = target file"]
    for s in SPLITS:
        rows = sets[s].rows
        mixes = [audio_info(r[1]) for r in rows]
        enrols = [audio_info(r[3]) for r in rows]
        same = sum(os.path.realpath(r[2]) == os.path.realpath(r[3]) for r in rows)
        lines.append(f"{s:6} {len(rows):6d} {sum(f / sr for f, sr, _ in mixes) / 3600:9.3f} "
                     f"{np.mean([f / sr for f, sr, _ in enrols]) if rows else 0:12.2f}  "
                     f"{sorted({sr for _, sr, _ in mixes})}  {same}")
    lines.append(f"missing entries: {len(data.missing)}")
    lines += [f"  {m}" for m in data.missing[:20]]
    return lines


def extraction_report(data: TSEData, n_train_samples: int = 100) -> str:
    """:func:`separation_report` plus the enrolments (generated data), or the report of the
    TSE lists."""
    if data.kind == CorpusKind.TSE_LISTS:
        return "\n".join(_list_lines(data))
    return "\n".join([separation_report(data, n_train_samples),
                      *_enrolment_lines(data, n_train_samples)])


def report(data: SeparationData, n_train_samples: int = 100) -> str:
    """The report of ``data``: :func:`extraction_report` for :class:`TSEData`, else
    :func:`separation_report`."""
    if isinstance(data, TSEData):
        return extraction_report(data, n_train_samples)
    return separation_report(data, n_train_samples)


def main(argv=None):
    p = argparse.ArgumentParser(description="Report on a separation or extraction corpus "
                                "(see modules/data/report.py).")
    p.add_argument("data_folder", nargs="*", default=None,
                   help="corpus folder, or several single-speaker corpora to pool; omit for the "
                        "synthetic speech-like corpus")
    p.add_argument("--n_src", type=int, default=2)
    p.add_argument("--sample_rate", type=int, default=8000)
    p.add_argument("--speaker_pattern", default=None)
    p.add_argument("--save_folder", default="results/data_report")
    p.add_argument("--cache_folder", default="results/data_cache")
    p.add_argument("--n_valid", type=int, default=40)
    p.add_argument("--n_test", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tse", action="store_true",
                   help="target-speaker extraction data (modules.data.enrolment.TSEData): adds the "
                        "enrolments")
    p.add_argument("--tse_lists", default=None,
                   help="folder of Libri2Mix-style TSE lists (train/valid/test.csv); implies --tse")
    a = p.parse_args(argv)
    folders = a.data_folder or None
    if folders and len(folders) == 1:
        folders = folders[0]
    kw = dict(save_folder=a.save_folder, cache_folder=a.cache_folder, n_src=a.n_src,
              sample_rate=a.sample_rate, speaker_pattern=a.speaker_pattern, n_valid=a.n_valid,
              n_test=a.n_test, seed=a.seed)
    if a.tse or a.tse_lists:
        data = TSEData(folders, tse_lists=a.tse_lists, **kw)
    else:
        data = SeparationData(folders, **kw)
    print(report(data))


if __name__ == "__main__":
    main()
