"""Readers of published mixture corpora: LibriMix metadata CSVs and WSJ0-2mix / -3mix folders.

Each reader returns ``(rows, missing)``: rows ``(id, mixture_path, [source_paths])`` whose files
all exist, and one message per listed mixture with a missing file.
"""

from __future__ import annotations

import csv
import glob
import os


def find_librimix_csvs(folder: str) -> dict:
    """``{split: [csv paths]}`` of the LibriMix ``mixture_<split>_mix_clean.csv`` files under
    ``folder`` (``train*`` -> train, ``dev`` -> valid, ``test`` -> test)."""
    csvs = glob.glob(os.path.join(folder, "**", "*.csv"), recursive=True)
    found = {}
    for path in sorted(csvs):
        name = os.path.basename(path)
        if "mix_clean" not in name:
            continue
        with open(path) as f:
            header = f.readline()
        if "mixture_path" not in header:
            continue
        split = "train" if "train" in name else "valid" if "dev" in name else "test" if "test" in name else None
        if split:
            found.setdefault(split, []).append(path)
    return found


def resolve_path(path: str, folder: str) -> str:
    """Resolve a metadata path: as written, relative to ``folder``, or re-rooted at ``folder``
    from its ``wav8k``/``wav16k`` component (published CSVs hold the generating machine's paths)."""
    if os.path.isabs(path) and os.path.exists(path):
        return path
    cand = os.path.join(folder, path)
    if os.path.exists(cand):
        return cand
    parts = path.replace("\\", "/").split("/")
    for k, part in enumerate(parts):
        if part.startswith("wav") and part.endswith("k"):
            for base in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
                cand = os.path.join(base, *parts[k:])
                if os.path.exists(cand):
                    return cand
    return path


def librimix_rows(csv_paths, folder, n_src):
    rows, missing = [], []
    for path in csv_paths:
        with open(path) as f:
            for r in csv.DictReader(f):
                srcs = [resolve_path(r[f"source_{k + 1}_path"], folder) for k in range(n_src)]
                mix = resolve_path(r["mixture_path"], folder)
                absent = [p for p in [mix, *srcs] if not os.path.exists(p)]
                if absent:
                    missing.append(f"{path}: {r['mixture_ID']}: missing {absent[0]}")
                    continue
                rows.append((r["mixture_ID"], mix, srcs))
    return rows, missing


def wsj0mix_rows(folder, split, n_src):
    mix_dir = os.path.join(folder, split, "mix")
    rows, missing = [], []
    for mix in sorted(glob.glob(os.path.join(mix_dir, "*.wav"))):
        name = os.path.basename(mix)
        srcs = [os.path.join(folder, split, f"s{k + 1}", name) for k in range(n_src)]
        absent = [p for p in srcs if not os.path.exists(p)]
        if absent:
            missing.append(f"{mix}: missing {absent[0]}")
            continue
        rows.append((os.path.splitext(name)[0], mix, srcs))
    return rows, missing
