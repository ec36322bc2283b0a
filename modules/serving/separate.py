"""Command line: separate a file, every audio file of a folder, or the files of a list file.

    python -m modules.serving.separate <in.wav | folder | list.txt | wav.scp> \
        --model <folder or HF id> --out <dir>

Writes ``<out>/<name>_source<k>.wav`` per input (see ``--help`` for how names are made). A file
that cannot be separated is reported and skipped; the others are still separated. Exit status 1
if any file failed, 2 if the command line cannot run (missing model folder, unwritable or
already-written outputs, a model folder of another kind) before anything is separated.

The helpers here (arguments, input lists, output names, checks, the loop over files) are shared
by :mod:`modules.serving.extract` and :mod:`modules.serving.transcribe`.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import sys
import tempfile
import textwrap

from speechbrain.utils.fetching import fetch
from tqdm import tqdm

from modules.data.audio import AudioError
from modules.data.corpora import AUDIO_EXTENSIONS
from modules.serving.inference import (SPEAKER_TRACKING, Separator, TargetSpeakerExtractor, TimbreTranscriber,
                                       UntrustedModelError, check_source, check_trusted,
                                       interface_class)

#: an input with one of these endings is read as a list of inputs
LIST_EXTENSIONS = (".txt", ".scp", ".lst", ".list")

#: the command that serves each interface, named when a model folder is given to the wrong one
COMMANDS = {
    Separator: "python -m modules.serving.separate <in> --model {model} --out <dir>",
    TargetSpeakerExtractor: "python -m modules.serving.extract --mix <in> --enroll <speaker.wav> "
                            "--model {model} --out <dir>",
    TimbreTranscriber: "python -m modules.serving.transcribe <in> --model {model} --out <dir>",
}

NAMING_HELP = """\
inputs: an audio file ({audio}); a folder (every audio file under it, files under --out
excluded); or a list file ({lists}), one entry a line: a path, or `<utt-id> <path>` as in a
Kaldi/ESPnet wav.scp. Relative paths in a list are relative to the list's folder; blank lines
and lines starting with # are skipped; pipe commands (`... |`) are refused.

output names: an entry with an utt-id writes <out>/<utt-id>{example}. Any other input writes
<out>/<relative path without extension>{example}, the path taken relative to the input folder
(folder input) or to the deepest folder holding every listed file (list input): a/mix.wav and
b/mix.wav write <out>/a/mix{example} and <out>/b/mix{example}. Two inputs that would get the same
name (mix.wav and mix.flac in one folder, a repeated utt-id) are refused.

Existing outputs are not replaced unless --overwrite is given; this is checked, together with
--out being writable, before anything is processed."""


class CommandError(Exception):
    """A problem with the command line found before any file is processed (exit status 2)."""


@dataclasses.dataclass
class Item:
    """One input: the audio ``path`` and its output ``name`` relative to ``--out``, without
    suffix (may hold folders, e.g. ``a/mix``)."""

    path: str
    name: str

    def output_dir(self, out: str) -> str:
        return os.path.join(out, os.path.dirname(self.name))

    @property
    def stem(self) -> str:
        return os.path.basename(self.name)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def read_list(list_path: str) -> list[tuple[str, str | None]]:
    """``(path, utt_id or None)`` per entry of a list file: a path a line, or ``<utt-id> <path>``
    (Kaldi/ESPnet ``wav.scp``). Relative paths are relative to the list file's folder. Blank
    lines and ``#`` comments are skipped; a pipe command or an archive offset raises
    :class:`CommandError`."""
    base = os.path.dirname(list_path)

    def resolve(p):
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.join(base, p)

    entries = []
    with open(list_path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{list_path} line {n} ({line!r})"
            if line.endswith("|"):
                raise CommandError(
                    f"{where} is a command, not a file: this tool reads audio files only; run the "
                    "command once to write a .wav and list that path instead")
            fields = line.split(maxsplit=1)
            if len(fields) == 1 or os.path.exists(resolve(line)):
                utt, path = None, line  # a plain path (possibly with spaces)
            else:
                utt, path = fields
                if utt in (".", "..") or "/" in utt or "\\" in utt:
                    raise CommandError(f"{where}: the utt-id {utt!r} names the output file and "
                                       "must not hold / or \\ or be . or ..")
            if re.search(r"\.ark:\d+$", path):
                raise CommandError(f"{where} points into a Kaldi archive (.ark:offset); write the "
                                   "audio out to files (e.g. with wav-copy) and list those")
            entries.append((resolve(path), utt))
    return entries


def list_inputs(target: str, exclude=()) -> list[Item]:
    """The inputs of ``target`` (audio file, folder or list file) with their output names (see
    :data:`NAMING_HELP`). Files inside any folder of ``exclude`` are left out of a folder's
    listing. Raises :class:`CommandError` when two inputs would get the same name."""
    if os.path.isdir(target):
        paths = sorted(p for p in glob.glob(os.path.join(target, "**", "*"), recursive=True)
                       if p.lower().endswith(AUDIO_EXTENSIONS) and os.path.isfile(p)
                       and not any(_inside(p, e) for e in exclude if e))
        entries, root = [(p, None) for p in paths], target
    elif target.lower().endswith(LIST_EXTENSIONS):
        if not os.path.isfile(target):
            raise CommandError(f"list file {target} does not exist")
        entries = read_list(target)
        plain = [os.path.dirname(os.path.abspath(p)) for p, utt in entries if utt is None]
        root = os.path.commonpath(plain) if plain else None
    else:
        entries, root = [(target, None)], os.path.dirname(os.path.abspath(target))
    items, seen = [], {}
    for path, utt in entries:
        if utt is not None:
            name = utt
        else:
            name = os.path.splitext(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))[0]
        if name in seen:
            raise CommandError(f"{seen[name]} and {path} would both write the outputs named "
                               f"{name!r}; rename one, or list them in a wav.scp with distinct "
                               "utt-ids")
        seen[name] = path
        items.append(Item(path, name))
    return items


def check_writable(out: str):
    """Create ``out`` and write a probe file in it; :class:`CommandError` when that fails."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise CommandError(f"cannot write to --out {out}: {err.strerror or err}; choose a folder "
                           "you can write to") from err


def existing_outputs(items: list[Item], out: str, suffixes: list[str]) -> list[str]:
    """Files under ``out`` that processing ``items`` would write: ``<name><suffix>`` where
    ``suffix`` is a regular expression (e.g. ``_source\\d+\\.wav``)."""
    found, listings = [], {}
    for item in items:
        folder = item.output_dir(out)
        if folder not in listings:
            listings[folder] = os.listdir(folder) if os.path.isdir(folder) else []
        pattern = re.compile(re.escape(item.stem) + "(?:" + "|".join(suffixes) + ")")
        found += sorted(os.path.join(folder, f) for f in listings[folder] if pattern.fullmatch(f))
    return found


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def common_arguments(doc: str, output_example: str, input_option: str | None = None
                     ) -> argparse.ArgumentParser:
    """The arguments every model command line shares (input, model, output, overwrite, trust,
    device, chunking, precision); the input is positional unless ``input_option`` (e.g.
    ``"--mix"``) names it. ``output_example`` (e.g. ``"_source1.wav"``) shows the output names
    in ``--help``."""
    epilog = NAMING_HELP.format(audio=", ".join(AUDIO_EXTENSIONS), lists=", ".join(LIST_EXTENSIONS),
                                example=output_example)
    epilog = "\n\n".join(textwrap.fill(" ".join(par.split()), 90) for par in epilog.split("\n\n"))
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = "audio file, folder of audio files, or list file (paths or wav.scp lines)"
    if input_option:
        p.add_argument(input_option, dest="input", required=True, help=what)
    else:
        p.add_argument("input", help=what)
    p.add_argument("--model", required=True, help="pretrained folder or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--savedir", default=None,
                   help="where to keep the fetched model files (default: <out>/.model)")
    p.add_argument("--trust_code", action="store_true",
                   help="load a model folder whose yaml names code outside this project, "
                        "speechbrain, torch and torchaudio (it runs that code)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk_seconds", type=positive_float, default=None,
                   help="process long input in chunks of this length (default: the model "
                        "folder's, else 10)")
    p.add_argument("--overlap_seconds", type=non_negative_float, default=None,
                   help="overlap of consecutive chunks, cross-faded (default: the model "
                        "folder's, else 2); must be below --chunk_seconds")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="bf16: faster on CPUs with AVX512-BF16/AMX (default: the model folder's "
                        "`precision`, else fp32)")
    return p


def speaker_tracking_argument(p):
    """``--speaker_tracking``, for the command lines that run a separation model."""
    p.add_argument("--speaker_tracking", choices=SPEAKER_TRACKING, default=None,
                   help="long input: which source of a chunk continues which output. global: by "
                        "GE2E speaker embeddings over the whole file (needs resemblyzer's weights); "
                        "overlap: by matching each chunk to the previous one (default: the model "
                        "folder's, else global)")


def model_interface(source: str, hparams: str, expected, trust_code: bool):
    """The interface class that serves the folder whose yaml is ``hparams``, when it is
    ``expected`` or a subclass of it; otherwise :class:`CommandError` naming the command that
    serves it."""
    check_trusted(hparams, trust_code)  # before interface_class imports what the yaml names
    cls = interface_class(hparams, trust_code)
    if isinstance(cls, type) and issubclass(cls, expected):
        return cls
    command = next((c for k, c in COMMANDS.items() if isinstance(cls, type) and issubclass(cls, k)),
                   None)
    hint = (f"use {command.format(model=source)}" if command
            else f"load it with {getattr(cls, '__name__', cls)}.from_hparams from Python")
    raise CommandError(f"{source} is a {getattr(cls, '__name__', cls)} model folder (the "
                       f"`interface:` of its hyperparams.yaml), not a {expected.__name__} one; {hint}")


def load_interface(expected, a, source: str):
    """Load the model folder (checked by :func:`check_source`) through the interface its yaml
    names, with the command line's device, chunking and precision set on the instance."""
    savedir = a.savedir or os.path.join(a.out, ".model")
    if os.path.isdir(source):
        hparams = os.path.join(source, "hyperparams.yaml")
    else:
        try:
            hparams = str(fetch(filename="hyperparams.yaml", source=source, savedir=savedir))
        except Exception as err:  # noqa: BLE001 - the Hub client raises many types
            raise CommandError(
                f"cannot fetch hyperparams.yaml of the Hugging Face repo {source} ({type(err).__name__}: "
                f"{' '.join(str(err).split())}); if {source} is meant as a local folder, it does not "
                "exist") from err
    cls = model_interface(a.model, hparams, expected, a.trust_code)
    iface = cls.from_hparams(source=source, savedir=savedir, run_opts={"device": a.device},
                             trust_code=a.trust_code)
    for key in ("chunk_seconds", "overlap_seconds", "precision", "speaker_tracking"):
        if getattr(a, key, None) is not None:
            setattr(iface, key, getattr(a, key))
    try:
        iface.chunking()
    except ValueError as err:
        raise CommandError(f"{err}: set --overlap_seconds below --chunk_seconds") from err
    return iface


def run(a, expected, outputs: list[str], work, verb: str, wrap=None) -> int:
    """The command lines' body: check the model source, the inputs and their output names, that
    ``--out`` is writable and (without ``--overwrite``) that no output exists, then load the
    model and run ``work(interface, item)`` on every input (:func:`process_all`), the
    interface writing ``item.stem`` outputs in ``item.output_dir(out)``. ``outputs``
    are the regular expressions of the output file suffixes; ``wrap`` (optional) turns the
    loaded interface into the one ``work`` takes. Returns the exit status: 2 for a problem found
    before processing, else that of :func:`process_all`."""
    try:
        source = check_source(a.model)
        savedir = a.savedir or os.path.join(a.out, ".model")
        items = list_inputs(a.input, exclude=(a.out, savedir))
        if not items:
            print(f"no audio files found in {a.input}", file=sys.stderr)
            return 1
        check_writable(a.out)
        if not a.overwrite:
            existing = existing_outputs(items, a.out, outputs)
            if existing:
                more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
                raise CommandError(f"{existing[0]} already exists{more}; pass --overwrite to "
                                   "replace, or choose another --out")
        iface = load_interface(expected, a, source)
        if wrap is not None:
            iface = wrap(iface)
    except (CommandError, FileNotFoundError, UntrustedModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def one(item):
        # the interfaces name their outputs output_stem(path); here the item's name does
        iface.output_stem = lambda _path: item.stem
        work(iface, item)

    return process_all(items, one, verb, a.out)


def process_all(items: list[Item], work, verb: str, out: str) -> int:
    """Run ``work(item)`` on every input with a progress bar. A file that fails is reported and
    the others still run; returns the exit status (1 if any failed)."""
    failed = []
    for item in tqdm(items, desc=verb, unit="file", disable=len(items) < 2):
        try:
            work(item)
        except (AudioError, OSError) as err:
            failed.append((item.path, str(err)))
        except Exception as err:  # noqa: BLE001 - one file's failure must not stop the others
            failed.append((item.path, f"{type(err).__name__}: {err}"))
    print(f"{verb}: {len(items) - len(failed)} of {len(items)} files done, outputs in {out}")
    for path, err in failed:
        print(f"FAILED {path}: {err}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    p = common_arguments(__doc__, "_source1.wav")
    p.add_argument("--channel", type=int, default=None, help="separate this channel only")
    p.add_argument("--resample_output", action="store_true",
                   help="write the sources at the input's sample rate")
    speaker_tracking_argument(p)
    a = p.parse_args(argv)

    def work(sep, item):
        sep.separate_file(item.path, output_dir=item.output_dir(a.out), channel=a.channel,
                          resample_output=a.resample_output)

    return run(a, Separator, [r"_source\d+\.wav"], work, "separating")


if __name__ == "__main__":
    sys.exit(main())
