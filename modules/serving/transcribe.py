"""Command line: transcribe music per instrument and separate it by timbre.

    python -m modules.serving.transcribe <in.wav | folder | list.txt | wav.scp> --model <folder or HF id> \
        --out <dir> [--n_instruments K] [--target k]

Writes per input ``<name>_instrument<k>.mid`` and ``.wav`` (or ``<name>_target.wav`` and
``<name>_rest.wav`` with ``--target``) and ``<name>_rolls.png`` (see ``--help`` for how names
are made). Without ``--n_instruments`` the number of instruments is estimated. A file that fails
is reported and the others are still processed; exit status 1 if any failed, 2 if the command
line cannot run.
"""

from __future__ import annotations

import sys

from modules.serving.inference import TimbreTranscriber
from modules.serving.separate import common_arguments, run

#: suffixes of what one input writes
OUTPUTS = [r"_instrument\d+\.(?:mid|wav)", r"_(?:target|rest)\.wav", r"_rolls\.png"]


def main(argv=None):
    p = common_arguments(__doc__, "_instrument1.wav")
    p.add_argument("--n_instruments", type=int, default=None, help="number of instruments (default: estimated)")
    p.add_argument("--target", type=int, default=None, help="write instrument k and the rest only")
    a = p.parse_args(argv)

    def work(tr, item):
        r = tr.transcribe_file(item.path, n_instruments=a.n_instruments,
                               output_dir=item.output_dir(a.out), target=a.target)
        print(f"{item.path}: {r['n_instruments']} instruments, "
              f"{', '.join(str(len(n)) for n in r['notes'])} notes")

    return run(a, TimbreTranscriber, OUTPUTS, work, "transcribing")


if __name__ == "__main__":
    sys.exit(main())
