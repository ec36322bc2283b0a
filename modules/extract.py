"""Command line: extract one speaker, given an enrolment recording, from a mixture (or from every
mixture of a folder / of a .txt list, all with the same enrolment).

    python -m modules.extract --mix <in.wav | folder | list.txt> --enroll <speaker.wav> \
        --model <folder or HF id> --out <dir>

Writes ``<out>/<name>_target.wav`` per mixture (see
:class:`modules.inference.TargetSpeakerExtractor`). A mixture that cannot be processed is
reported and skipped; exit status 1 if any failed.
"""

from __future__ import annotations

import os
import sys

from .separate import common_arguments, load_interface, process_all


def main(argv=None):
    p = common_arguments(__doc__, input_option="--mix")
    p.add_argument("--enroll", required=True, help="enrolment recording of the speaker to extract")
    p.add_argument("--channel", type=int, default=None, help="use this channel of each file")
    p.add_argument("--resample_output", action="store_true",
                   help="write the estimate at the mixture's sample rate")
    a = p.parse_args(argv)
    if not os.path.isfile(a.enroll):
        print(f"enrolment {a.enroll} is not a file", file=sys.stderr)
        return 1
    from .inference import TargetSpeakerExtractor

    tse = load_interface(TargetSpeakerExtractor, a)
    return process_all(a.input, lambda path: tse.extract_file(
        path, a.enroll, output_dir=a.out, channel=a.channel, resample_output=a.resample_output),
        "extracting", a.out)


if __name__ == "__main__":
    sys.exit(main())
