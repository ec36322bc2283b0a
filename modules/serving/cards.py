"""Model cards (the ``README.md`` of a Hugging Face model folder), one per interface.

Each card has the Hub front matter (library, pipeline tag, licence, tags, datasets), what the
model is (sample rate, number of speakers or instruments), the test metrics of the run, the
files of the folder and a usage snippet. Training data is named by the corpus, never by a local
path.
"""

from __future__ import annotations

import os

# corpus folder names of ../shared/data and published corpora -> Hugging Face dataset ids
KNOWN_DATASETS = {
    "librispeech": "openslr/librispeech_asr",
    "speechocean762": "mispeech/speechocean762",
}

FILE_NOTES = {
    "model.safetensors": "weights (safetensors)",
    "model.ckpt": "weights (PyTorch state dict, loads with `weights_only=True`)",
    "model.onnx": "ONNX graph (opset 18, dynamic batch and length): `mix [batch, time]` -> "
                  "`sources [batch, time, n_src]`",
    "model.torchscript.pt": "TorchScript module, same input and output as the ONNX graph",
    "hyperparams.yaml": "the model as trained, loaded by the interface it names",
}


def corpus_names(data_folder) -> list[str]:
    """Corpus names of a run's ``data_folder`` (a path, a list of paths, or empty)."""
    if not data_folder:
        return []
    folders = data_folder if isinstance(data_folder, (list, tuple)) else [data_folder]
    return [os.path.basename(os.path.normpath(str(f))) for f in folders]


def training_data(run) -> str:
    names = corpus_names(run.get("data_folder"))
    return ", ".join(names) if names else "a synthetic speech-like corpus (not real speech)"


def card(name, run, licence, files, *, tags, intro, metrics, usage,
         pipeline_tag="audio-to-audio") -> str:
    datasets = _datasets(run)
    lines = ["---", "library_name: speechbrain", f"pipeline_tag: {pipeline_tag}",
             f"license: {licence}", "tags:", *[f"- {t}" for t in (*tags, "speechbrain")]]
    if datasets:
        lines += ["datasets:", *[f"- {d}" for d in datasets]]
    lines += ["---", f"# {name}", "", *intro, ""]
    lines += metrics or ["No test metrics were found (test_summary.json missing).", ""]
    lines += ["## Files", "", *[f"- `{f}`: {FILE_NOTES[f]}" for f in files if f in FILE_NOTES], ""]
    lines += ["## Usage", "",
              "Install the recipe collection this model was trained with (`pip install .` in its "
              "checkout), which provides the `modules` package, then:", "",
              "```python", *usage, "```", ""]
    return "\n".join(lines)


def _usage(interface, var, repo_id, name, call):
    source = repo_id or "<this folder>"
    return [f"from modules.serving.inference import {interface}",
            f'{var} = {interface}.from_hparams(source="{source}", savedir="pretrained/{name}")', call]


def _datasets(run):
    return [KNOWN_DATASETS[n.lower()] for n in corpus_names(run.get("data_folder"))
            if n.lower() in KNOWN_DATASETS]


def separation_card(name, run, summary, repo_id, licence, hparams, files):
    n_src = getattr(hparams, "num_spks", None) or run.get("num_spks", 2)
    metrics = None
    if summary:
        metrics = [f"Test set: {summary.get('n_mixtures')} mixtures.", "",
                   "| SI-SNR | SI-SNRi | SDR | SDRi |", "|---|---|---|---|",
                   "| " + " | ".join(f"{summary[k]:.2f} dB" for k in ("si-snr", "si-snr_i", "sdr", "sdr_i"))
                   + " |", ""]
    return card(name, run, licence, files, tags=["audio-source-separation", "speech-separation"],
                intro=[f"Speech separation into {n_src} speakers at {hparams.sample_rate} Hz, trained "
                       f"with the `{name}` recipe on {training_data(run)}."],
                metrics=metrics,
                usage=_usage("Separator", "sep", repo_id, name,
                             'est = sep.separate_file("mixture.wav", output_dir="separated/")  # [1, time, n_src]'))


#: what the extraction card says of each model class
EXTRACTION_MODELS = {"WavLMTasNet": "WavLM + TasNet mask", "WavLMDynamicTasNet": "WavLM + TasNet mask",
                     "STFTMaskExtractor": "STFT mask from a BLSTM conditioned on the enrolment's GE2E "
                                          "d-vector; needs `pip install --no-deps resemblyzer==0.1.4`"}


def extraction_card(name, run, summary, repo_id, licence, hparams, files):
    metrics = None
    if summary:
        metrics = [f"Test set: {summary.get('n_mixtures')} two-speaker mixtures, enrolment: "
                   f"{', '.join(summary.get('enroll_modes', [])) or 'n/a'}.", "",
                   "| SI-SDR | SI-SDRi | target confusion rate |", "|---|---|---|",
                   f"| {summary['si-sdr']:.2f} dB | {summary['si-sdr_i']:.2f} dB | "
                   f"{100 * summary['target_confusion_rate']:.1f} % |", "",
                   "Target confusion: the output is closer (SI-SDR) to the interferer than to the target.", ""]
    return card(name, run, licence, files, tags=["target-speaker-extraction"],
                intro=[f"Target-speaker extraction at {hparams.sample_rate} Hz "
                       f"({EXTRACTION_MODELS.get(type(getattr(hparams, 'model', None)).__name__, 'mask model')}, "
                       f"SI-SDR loss against the target), trained with the `{name}` recipe on "
                       f"{training_data(run)}."],
                metrics=metrics,
                usage=_usage("TargetSpeakerExtractor", "tse", repo_id, name,
                             'est = tse.extract_file("mixture.wav", "enrollment.wav", output_dir="extracted/")  # [1, time]'))


def transcription_card(name, run, summary, repo_id, licence, hparams, files):
    metrics = None
    sets = [k for k in sorted(summary or {}) if isinstance(summary[k], dict)]
    if sets:
        cols = ("agnostic_onset_f1", "agnostic_offset_f1", "instrument_onset_f1",
                "oracle_clusters_onset_f1", "random_clusters_onset_f1", "cluster_accuracy")
        metrics = ["Note F1 by `mir_eval` on unseen pieces (onset only unless said), "
                   f"after {summary.get('train_minutes', 0):.0f} minutes of training.", "",
                   "| test set | examples | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                   "|---" * (len(cols) + 2) + "|"]
        metrics += [f"| {k} | {summary[k].get('n_examples')} | "
                    + " | ".join(f"{summary[k][c]:.3f}" for c in cols) + " |" for k in sets]
        metrics.append("")
    data = training_data(run) if run.get("data_folder") else (
        "Bach chorales of music21 rendered per instrument with a General MIDI SoundFont")
    return card(name, run, licence, files, tags=["music-transcription", "music-source-separation"],
                intro=[f"Timbre separation and transcription of music at {hparams.sample_rate} Hz "
                       "(TimbreNet): note and onset posteriors per pitch and frame, and an embedding "
                       "per time-frequency unit that k-means groups into instruments. Trained with "
                       f"the `{name}` recipe on {data}."],
                metrics=metrics,
                usage=_usage("TimbreTranscriber", "tr", repo_id, name,
                             'r = tr.transcribe_file("music.wav", n_instruments=None, output_dir="out/")  # notes, rolls, audio'))
