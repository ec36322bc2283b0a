"""Command line: extract one speaker, given an enrolment recording, from a mixture (or from every
mixture of a folder / of a .txt list, all with the same enrolment).

    python -m modules.extract --mix <in.wav | folder | list.txt> --enroll <speaker.wav> \
        --model <folder or HF id> --out <dir>

Writes ``<out>/<name>_target.wav`` per mixture (see
:class:`modules.inference.TargetSpeakerExtractor`). A mixture that cannot be processed is
reported and skipped; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from .audio import AudioError
from .separate import list_inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mix", required=True, help="mixture file, folder of mixtures, or .txt list of paths")
    p.add_argument("--enroll", required=True, help="enrolment recording of the speaker to extract")
    p.add_argument("--model", required=True, help="pretrained folder or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--savedir", default=None, help="where to keep the fetched model files")
    p.add_argument("--channel", type=int, default=None, help="use this channel of each file")
    p.add_argument("--resample_output", action="store_true",
                   help="write the estimate at the mixture's sample rate")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not os.path.isfile(a.enroll):
        print(f"enrolment {a.enroll} is not a file", file=sys.stderr)
        return 1
    from .inference import TargetSpeakerExtractor

    tse = TargetSpeakerExtractor.from_hparams(source=a.model,
                                              savedir=a.savedir or os.path.join(a.out, ".model"),
                                              run_opts={"device": a.device})
    paths = list_inputs(a.mix)
    if not paths:
        print(f"no audio files found in {a.mix}", file=sys.stderr)
        return 1
    failed = []
    for path in tqdm(paths, desc="extracting", unit="file", disable=len(paths) < 2):
        try:
            tse.extract_file(path, a.enroll, output_dir=a.out, channel=a.channel,
                             resample_output=a.resample_output)
        except (AudioError, OSError) as err:
            failed.append((path, str(err)))
        except Exception as err:  # noqa: BLE001 - one file's failure must not stop the others
            failed.append((path, f"{type(err).__name__}: {err}"))
    print(f"extracted the speaker of {a.enroll} from {len(paths) - len(failed)} of {len(paths)} "
          f"mixtures into {a.out}")
    for path, err in failed:
        print(f"FAILED {path}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
