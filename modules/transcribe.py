"""Command line: transcribe music per instrument and separate it by timbre.

    python -m modules.transcribe <in.wav | folder | list.txt> --model <folder or HF id> --out <dir>
                                 [--n_instruments K] [--target k]

Writes per input ``<name>_instrument<k>.mid`` and ``.wav`` (or ``<name>_target.wav`` and
``<name>_rest.wav`` with ``--target``) and ``<name>_rolls.png``. Without ``--n_instruments`` the
number of instruments is estimated. A file that fails is reported and the others are still
processed; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from .separate import list_inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="audio file, folder of audio files, or .txt list of paths")
    p.add_argument("--model", required=True, help="pretrained folder or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n_instruments", type=int, default=None, help="number of instruments (default: estimated)")
    p.add_argument("--target", type=int, default=None, help="write instrument k and the rest only")
    p.add_argument("--savedir", default=None, help="where to keep the fetched model files")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    from .inference import TimbreTranscriber

    tr = TimbreTranscriber.from_hparams(source=a.model, savedir=a.savedir or os.path.join(a.out, ".model"),
                                        run_opts={"device": a.device})
    paths = list_inputs(a.input)
    if not paths:
        print(f"no audio files found in {a.input}", file=sys.stderr)
        return 1
    failed = []
    for path in tqdm(paths, desc="transcribing", unit="file", disable=len(paths) < 2):
        try:
            r = tr.transcribe_file(path, n_instruments=a.n_instruments, output_dir=a.out, target=a.target)
            print(f"{path}: {r['n_instruments']} instruments, "
                  f"{', '.join(str(len(n)) for n in r['notes'])} notes")
        except Exception as err:  # noqa: BLE001 - one file's failure must not stop the others
            failed.append((path, f"{type(err).__name__}: {err}"))
    print(f"transcribed {len(paths) - len(failed)} of {len(paths)} files into {a.out}")
    for path, err in failed:
        print(f"FAILED {path}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
