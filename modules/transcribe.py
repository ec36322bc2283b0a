"""Command line: transcribe music per instrument and separate it by timbre.

    python -m modules.transcribe <in.wav | folder | list.txt> --model <folder or HF id> --out <dir>
                                 [--n_instruments K] [--target k]

Writes per input ``<name>_instrument<k>.mid`` and ``.wav`` (or ``<name>_target.wav`` and
``<name>_rest.wav`` with ``--target``) and ``<name>_rolls.png``. Without ``--n_instruments`` the
number of instruments is estimated. A file that fails is reported and the others are still
processed; exit status 1 if any failed.
"""

from __future__ import annotations

import sys

from .separate import common_arguments, load_interface, process_all


def main(argv=None):
    p = common_arguments(__doc__)
    p.add_argument("--n_instruments", type=int, default=None, help="number of instruments (default: estimated)")
    p.add_argument("--target", type=int, default=None, help="write instrument k and the rest only")
    a = p.parse_args(argv)
    from .inference import TimbreTranscriber

    tr = load_interface(TimbreTranscriber, a)

    def work(path):
        r = tr.transcribe_file(path, n_instruments=a.n_instruments, output_dir=a.out, target=a.target)
        print(f"{path}: {r['n_instruments']} instruments, "
              f"{', '.join(str(len(n)) for n in r['notes'])} notes")

    return process_all(a.input, work, "transcribing", a.out)


if __name__ == "__main__":
    sys.exit(main())
