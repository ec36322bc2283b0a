"""Command line: extract one speaker, given an enrolment recording, from a mixture (or from every
mixture of a folder / of a list file, all with the same enrolment).

    python -m modules.serving.extract --mix <in.wav | folder | list.txt | wav.scp> --enroll <speaker.wav> \
        --model <folder or HF id> --out <dir>

Writes ``<out>/<name>_target.wav`` per mixture (see ``--help`` for how names are made, and
:class:`modules.serving.inference.TargetSpeakerExtractor`). With ``--select`` the model is a
separation model: each mixture is separated and the source whose GE2E d-vector is closest to the
enrolment's is written (:class:`modules.serving.select.SeparateThenSelect`; nothing trained).
A mixture that cannot be processed is reported and skipped; exit status 1 if any failed, 2 if the command line cannot run.
"""

from __future__ import annotations

import os
import sys

from modules.serving.inference import Separator, TargetSpeakerExtractor
from modules.serving.select import SeparateThenSelect
from modules.serving.separate import common_arguments, run, speaker_tracking_argument


def main(argv=None):
    p = common_arguments(__doc__, "_target.wav", input_option="--mix")
    p.add_argument("--enroll", required=True, help="enrolment recording of the speaker to extract")
    p.add_argument("--channel", type=int, default=None, help="use this channel of each file")
    p.add_argument("--resample_output", action="store_true",
                   help="write the estimate at the mixture's sample rate")
    p.add_argument("--select", action="store_true",
                   help="--model is a separation model: separate, then keep the source closest to "
                        "the enrolment in GE2E d-vector space (needs resemblyzer's weights)")
    speaker_tracking_argument(p)  # the separator of --select
    a = p.parse_args(argv)
    if not os.path.isfile(a.enroll):
        print(f"error: enrolment {a.enroll} is not a file", file=sys.stderr)
        return 2

    def work(tse, item):
        tse.extract_file(item.path, a.enroll, output_dir=item.output_dir(a.out), channel=a.channel,
                         resample_output=a.resample_output)

    if a.select:
        return run(a, Separator, [r"_target\.wav"], work, "extracting", wrap=SeparateThenSelect)
    return run(a, TargetSpeakerExtractor, [r"_target\.wav"], work, "extracting")


if __name__ == "__main__":
    sys.exit(main())
