"""Command line: separate a file, every audio file of a folder, or the files listed in a text file.

    python -m modules.separate <in.wav | folder | list.txt> --model <folder or HF id> --out <dir>

Writes ``<out>/<name>_source<k>.wav`` per input. A file that cannot be separated is reported
and skipped; the others are still separated. Exit status 1 if any file failed.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from tqdm import tqdm

from .audio import AudioError
from .data import AUDIO_EXTENSIONS


def list_inputs(target: str):
    if os.path.isdir(target):
        return sorted(p for p in glob.glob(os.path.join(target, "**", "*"), recursive=True)
                      if p.lower().endswith(AUDIO_EXTENSIONS))
    if target.lower().endswith(".txt"):
        with open(target) as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return [target]


def common_arguments(doc: str, input_option: str | None = None) -> argparse.ArgumentParser:
    """The arguments every model command line shares (input, model, output, device); the input
    is positional unless ``input_option`` (e.g. ``"--mix"``) names it."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    what = "audio file, folder of audio files, or .txt list of paths"
    if input_option:
        p.add_argument(input_option, dest="input", required=True, help=what)
    else:
        p.add_argument("input", help=what)
    p.add_argument("--model", required=True, help="pretrained folder or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--savedir", default=None, help="where to keep the fetched model files")
    p.add_argument("--device", default="cpu")
    return p


def load_interface(cls, a):
    return cls.from_hparams(source=a.model, savedir=a.savedir or os.path.join(a.out, ".model"),
                            run_opts={"device": a.device})


def process_all(target: str, work, verb: str, out: str) -> int:
    """Run ``work(path)`` on every input of ``target`` (file, folder, .txt list) with a progress
    bar. A file that fails is reported and the others still run; returns the exit status."""
    paths = list_inputs(target)
    if not paths:
        print(f"no audio files found in {target}", file=sys.stderr)
        return 1
    failed = []
    for path in tqdm(paths, desc=verb, unit="file", disable=len(paths) < 2):
        try:
            work(path)
        except (AudioError, OSError) as err:
            failed.append((path, str(err)))
        except Exception as err:  # noqa: BLE001 - one file's failure must not stop the others
            failed.append((path, f"{type(err).__name__}: {err}"))
    print(f"{verb}: {len(paths) - len(failed)} of {len(paths)} files done, outputs in {out}")
    for path, err in failed:
        print(f"FAILED {path}: {err}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    p = common_arguments(__doc__)
    p.add_argument("--channel", type=int, default=None, help="separate this channel only")
    p.add_argument("--resample_output", action="store_true",
                   help="write the sources at the input's sample rate")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="bf16: faster on CPUs with AVX512-BF16/AMX (default: the model folder's "
                        "`precision`, else fp32)")
    a = p.parse_args(argv)
    from .inference import Separator

    sep = load_interface(Separator, a)
    if a.precision:
        sep.precision = a.precision
    return process_all(a.input, lambda path: sep.separate_file(
        path, output_dir=a.out, channel=a.channel, resample_output=a.resample_output),
        "separating", a.out)


if __name__ == "__main__":
    sys.exit(main())
