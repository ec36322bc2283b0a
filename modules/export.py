"""Turn a training output folder into a Hugging Face model folder, and optionally upload it.

    python -m modules.export <training output folder> <hub folder> [--hparams <inference yaml>]
                             [--push <user/repo>]
    python -m modules.export --from-clearvoice <ClearerVoice MossFormer2_SS checkpoint> <hub folder>

The hub folder gets ``hyperparams.yaml`` (the model's top-level ``hparams/<experiment>.yaml``,
or ``hparams/<task>/<experiment>.yaml`` such as ``hparams/target_speaker/``, unless ``--hparams``
names another), ``model.ckpt`` (the model weights of the best checkpoint by the recipe's
``valid_metric``, SI-SNR by default, a plain state dict that loads with weights_only=True
in ``torch.load``) and a model card ``README.md`` with the test metrics of
``test_summary.json`` and a usage snippet. The folder is loaded back through the interface its
yaml names (``interface:``; :class:`modules.inference.Separator` by default, e.g.
``TargetSpeakerExtractor`` for target-speaker extraction) before anything is uploaded, and the
weights must fit the yaml's model exactly.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _saved_value(text: str, key: str):
    """Plain value of a top-level ``key:`` line of a saved yaml (None when empty or null)."""
    m = re.search(rf"^{key}:[ \t]*([^#\n]*?)[ \t]*(#.*)?$", text, re.M)
    value = m.group(1) if m else None
    return None if value in (None, "", "null", "~") else value


def remove_written(hub_folder: str):
    """Delete what an export wrote into ``hub_folder`` (and only that): nothing half-made is left,
    and none of the user's own files are touched."""
    for written in ("hyperparams.yaml", "model.ckpt", ".check"):
        path = os.path.join(hub_folder, written)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def best_checkpoint(output_folder: str, metric: str = "si-snr") -> str:
    """Folder of the checkpoint with the highest ``metric`` in ``<output_folder>/save``."""
    best, best_value = None, -float("inf")
    for meta_path in glob.glob(os.path.join(output_folder, "save", "CKPT+*", "CKPT.yaml")):
        with open(meta_path) as f:
            meta = yaml.safe_load(f) or {}
        if metric in meta and meta[metric] > best_value:
            best, best_value = os.path.dirname(meta_path), meta[metric]
    if best is None:
        raise FileNotFoundError(f"no checkpoint with a '{metric}' value under {output_folder}/save; "
                                "train first (recipes/separation/train.py) or check the folder")
    return best


def _card(tag, name, intro, metrics, usage):
    """A model card: Hub front matter, title, ``intro`` lines, ``metrics`` lines (or a note that
    there are none), then a usage section of ``usage`` lines."""
    lines = [f"---\nlibrary_name: speechbrain\ntags:\n- {tag}\n- speechbrain\n---", f"# {name}", "",
             *intro]
    lines += metrics or ["No test metrics were found (test_summary.json missing).", ""]
    lines += ["## Usage", "", "```python", *usage,
              "`modules` is the recipe collection this model was trained with.", ""]
    return "\n".join(lines)


def model_card(name, data, summary, repo_id):
    source = repo_id or "<this folder>"
    metrics = None
    if summary:
        metrics = [f"Test set: {summary.get('n_mixtures')} mixtures.", "",
                   "| SI-SNR | SI-SNRi | SDR | SDRi |", "|---|---|---|---|",
                   "| " + " | ".join(f"{summary[k]:.2f} dB" for k in ("si-snr", "si-snr_i", "sdr", "sdr_i"))
                   + " |", ""]
    return _card("audio-source-separation", name,
                 [f"Speech separation model trained with the `{name}` recipe (SI-SNR + PIT).", "",
                  f"Training data: {data}.", ""], metrics,
                 ["from modules.inference import Separator",
                  f'sep = Separator.from_hparams(source="{source}", savedir="pretrained/{name}")',
                  'est = sep.separate_file("mixture.wav", output_dir="separated/")  # [1, time, n_src]',
                  "```", ""])


def extraction_model_card(name, data, summary, repo_id):
    """Model card of a target-speaker extraction model (recipes/target_speaker)."""
    source = repo_id or "<this folder>"
    metrics = None
    if summary:
        metrics = [f"Test set: {summary.get('n_mixtures')} two-speaker mixtures, enrolment: "
                   f"{', '.join(summary.get('enroll_modes', [])) or 'n/a'}.", "",
                   "| SI-SDR | SI-SDRi | target confusion rate |", "|---|---|---|",
                   f"| {summary['si-sdr']:.2f} dB | {summary['si-sdr_i']:.2f} dB | "
                   f"{100 * summary['target_confusion_rate']:.1f} % |", "",
                   "Target confusion: the output is closer (SI-SDR) to the interferer than to the target.", ""]
    return _card("target-speaker-extraction", name,
                 [f"Target-speaker extraction model trained with the `{name}` recipe (WavLM + TasNet "
                  "mask, SI-SDR loss against the target).", "", f"Training data: {data}.", ""], metrics,
                 ["from modules.inference import TargetSpeakerExtractor",
                  f'tse = TargetSpeakerExtractor.from_hparams(source="{source}", savedir="pretrained/{name}")',
                  'est = tse.extract_file("mixture.wav", "enrollment.wav", output_dir="extracted/")  # [1, time]',
                  "```", "", "or `python -m modules.extract --mix mixture.wav --enroll enrollment.wav "
                  f"--model {source} --out extracted/`.", ""])


def transcription_model_card(name, data, summary, repo_id):
    """Model card of a timbre separation + transcription model (recipes/timbre)."""
    source = repo_id or "<this folder>"
    metrics = None
    sets = [k for k in sorted(summary or {}) if isinstance(summary[k], dict)]
    if sets:
        cols = ("agnostic_onset_f1", "agnostic_offset_f1", "instrument_onset_f1",
                "oracle_clusters_onset_f1", "random_clusters_onset_f1", "cluster_accuracy")
        metrics = ["Note F1 by `mir_eval` on unseen chorales (onset only unless said), "
                   f"after {summary.get('train_minutes', 0):.0f} minutes of training.", "",
                   "| test set | examples | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                   "|---" * (len(cols) + 2) + "|"]
        metrics += [f"| {k} | {summary[k].get('n_examples')} | "
                    + " | ".join(f"{summary[k][c]:.3f}" for c in cols) + " |" for k in sets]
        metrics.append("")
    return _card("music-transcription", name,
                 [f"Timbre separation and transcription model (TimbreNet) trained with the `{name}` "
                  "recipe: note and onset posteriors per pitch and frame, and an embedding per "
                  "time-frequency unit that k-means groups into instruments.", "",
                  f"Training data: {data}.", ""], metrics,
                 ["from modules.inference import TimbreTranscriber",
                  f'tr = TimbreTranscriber.from_hparams(source="{source}", savedir="pretrained/{name}")',
                  'r = tr.transcribe_file("music.wav", n_instruments=None, output_dir="out/")  # notes, rolls, audio',
                  "```", "", f"or `python -m modules.transcribe music.wav --model {source} --out out/`.", ""])


CARDS = {"Separator": model_card, "TargetSpeakerExtractor": extraction_model_card,
         "TimbreTranscriber": transcription_model_card}


def export(output_folder: str, hub_folder: str, hparams: str | None = None,
           repo_id: str | None = None) -> str:
    """Write the hub folder; returns its path. See the module docstring."""
    saved = os.path.join(output_folder, "hyperparams.yaml")
    if not os.path.exists(saved):
        raise FileNotFoundError(f"{saved} not found: is {output_folder} a training output folder?")
    with open(saved) as f:
        text = f.read()
    name = _saved_value(text, "experiment_name") or "model"
    if not hparams:  # hparams/<name>.yaml, or hparams/<task>/<name>.yaml (e.g. target_speaker)
        hparams = os.path.join(ROOT, "hparams", f"{name}.yaml")
        nested = sorted(glob.glob(os.path.join(ROOT, "hparams", "*", f"{name}.yaml")))
        hparams = hparams if os.path.exists(hparams) or not nested else nested[0]
    if not os.path.exists(hparams):
        known = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "hparams", "*.yaml")))
        raise FileNotFoundError(f"no inference yaml {hparams}; pass --hparams (known: {known})")
    ckpt = best_checkpoint(output_folder, _saved_value(text, "valid_metric") or "si-snr")
    with open(hparams) as f:
        inference = f.read()
    # the run's values of the inference yaml's plain top-level keys (sizes and sample rate
    # overridden on the training command line, e.g. --N=128 --sample_rate=8000)
    plain = re.findall(r"^(\w+):[ \t]*[^!#\n\s][^\n]*$", inference, re.M)
    inference = set_yaml_values(inference, {k: v for k in plain
                                            if (v := _saved_value(text, k)) is not None})
    os.makedirs(hub_folder, exist_ok=True)
    with open(os.path.join(hub_folder, "hyperparams.yaml"), "w") as f:
        f.write(inference)
    state = torch.load(os.path.join(ckpt, "model.ckpt"), map_location="cpu", weights_only=True)
    torch.save(state, os.path.join(hub_folder, "model.ckpt"))

    from .inference import interface_class

    interface = interface_class(hparams)  # Separator unless the yaml names another
    try:  # load the folder back as a user will, and insist on an exact fit of every weight
        sep = interface.from_hparams(source=os.path.abspath(hub_folder),
                                     savedir=os.path.join(hub_folder, ".check"))
        sep.mods.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        remove_written(hub_folder)
        raise RuntimeError(f"the weights of {ckpt} do not fit the model of {hparams}; was the "
                           f"model trained with architecture overrides? ({err})") from err
    shutil.rmtree(os.path.join(hub_folder, ".check"), ignore_errors=True)
    summary = None
    summary_path = os.path.join(output_folder, "test_summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    if interface.__name__ == "TimbreTranscriber":
        data = ("Bach chorales of music21 rendered per instrument with the SoundFont "
                f"{_saved_value(text, 'soundfont') or 'TimGM6mb (pretty_midi)'}")
    else:
        data = _saved_value(text, "data_folder") or "synthetic speech-like corpus (not real speech)"
    card = CARDS.get(interface.__name__, model_card)
    with open(os.path.join(hub_folder, "README.md"), "w") as f:
        f.write(card(name, data, summary, repo_id))
    return hub_folder


def deployment_lengths(sample_rate: int) -> list[int]:
    """Input lengths (samples) at which exported models are checked: short, odd, a few seconds."""
    return [int(0.25 * sample_rate) + 3, sample_rate, int(3.3 * sample_rate) + 1]


def _check_equal(name, run, model, lengths, tol):
    """Largest |exported - PyTorch| over inputs of several lengths (batch 2); raises above tol."""
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for n in lengths:
        x = torch.randn(2, n, generator=gen)
        with torch.no_grad():
            ref = model(x)
        out = torch.as_tensor(run(x))
        if out.shape != ref.shape:
            raise RuntimeError(f"{name} output has shape {tuple(out.shape)} for an input of "
                               f"{n} samples, PyTorch gives {tuple(ref.shape)}")
        worst = max(worst, (out - ref).abs().max().item())
    if not worst <= tol:
        raise RuntimeError(f"{name} export differs from PyTorch by {worst:.2e} (> {tol:.0e})")
    return worst


def deploy(model: torch.nn.Module, folder: str, sample_rate: int, tol: float = 1e-4) -> dict:
    """Write ``model.torchscript.pt`` (``torch.jit.script``) and ``model.onnx`` (opset 18,
    dynamic batch and length) of a separation model into ``folder``, each checked against
    PyTorch on inputs of several lengths. Returns ``{file name: max abs difference}``.

    Both take ``mix [batch, time]`` and return ``[batch, time, n_src]``. The ONNX graph
    needs inputs longer than one encoder frame (pad shorter ones with zeros)."""
    import onnxruntime as ort

    model = model.eval().cpu()
    lengths = deployment_lengths(sample_rate)
    os.makedirs(folder, exist_ok=True)
    ts_path, onnx_path = os.path.join(folder, "model.torchscript.pt"), os.path.join(folder, "model.onnx")
    try:
        scripted = torch.jit.script(model)
    except Exception as err:  # noqa: BLE001 - report which model cannot be scripted and why
        raise RuntimeError(f"{type(model).__name__} cannot be compiled by torch.jit.script: {err}") from err
    scripted.save(ts_path)
    loaded = torch.jit.load(ts_path)
    report = {"model.torchscript.pt": _check_equal("TorchScript", loaded, model, lengths, tol)}

    frame = getattr(getattr(model, "encoder", None), "kernel_size", 1)
    time_dim = torch.export.Dim("time", min=frame + 1)
    try:
        with torch.no_grad():
            torch.onnx.export(model, (torch.randn(2, lengths[-1]),), onnx_path, dynamo=True,
                              input_names=["mix"], output_names=["sources"], opset_version=18,
                              dynamic_shapes=({0: torch.export.Dim("batch"), 1: time_dim},),
                              external_data=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - name the model and keep the exporter's reason
        raise RuntimeError(f"{type(model).__name__} cannot be exported to ONNX with a dynamic "
                           f"length: {str(err)[:2000]}") from err
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    report["model.onnx"] = _check_equal(
        "ONNX", lambda x: sess.run(None, {"mix": x.numpy()})[0], model, lengths, tol)
    return report


def set_yaml_values(text: str, values: dict) -> str:
    """``text`` with the plain top-level ``key: value`` lines of ``values`` replaced (comments
    kept); a key that the yaml does not have is an error."""
    for key, value in values.items():
        text, n = re.subn(rf"^({re.escape(key)}:[ \t]*)[^#\n]*?([ \t]*(#.*)?)$",
                          lambda m: f"{m.group(1)}{value}{m.group(2)}", text, count=1, flags=re.M)
        if not n:
            raise KeyError(f"the inference yaml has no top-level '{key}:' line to set")
    return text


def export_clearvoice(checkpoint: str, hub_folder: str, hparams: str | None = None,
                      repo_id: str | None = None) -> str:
    """Convert a ClearerVoice ``MossFormer2_SS_16K`` checkpoint into a hub folder; returns it.

    The sizes are read off the checkpoint and written into ``hparams/mossformer2.yaml`` (or
    ``hparams``), the weights are renamed to ours (:mod:`modules.mossformer2`; every key must
    fit), and the folder is loaded back through :class:`modules.inference.Separator`, which
    must give exactly the output of the converted model.
    """
    from .inference import Separator
    from .mossformer2 import clearvoice_config, load_clearvoice_checkpoint, read_clearvoice_state_dict

    state = read_clearvoice_state_dict(checkpoint)
    cfg = clearvoice_config(state)
    model = load_clearvoice_checkpoint(state).eval()
    hparams = hparams or os.path.join(ROOT, "hparams", "mossformer2.yaml")
    with open(hparams) as f:
        text = f.read()
    sizes = {"num_spks": cfg.pop("n_src"), **cfg}
    text = set_yaml_values(text, {k: v for k, v in sizes.items() if k != "dropout"})
    os.makedirs(hub_folder, exist_ok=True)
    with open(os.path.join(hub_folder, "hyperparams.yaml"), "w") as f:
        f.write(text)
    torch.save(model.state_dict(), os.path.join(hub_folder, "model.ckpt"))
    check = os.path.join(hub_folder, ".check")
    try:
        sep = Separator.from_hparams(source=os.path.abspath(hub_folder), savedir=check)
        sep.mods.model.load_state_dict(model.state_dict(), strict=True)
        x = torch.randn(1, int(sep.hparams.sample_rate), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if not torch.equal(sep.separate_batch(x), model(x)):
                raise RuntimeError("the folder's model does not reproduce the converted weights")
    except RuntimeError as err:
        remove_written(hub_folder)
        raise RuntimeError(f"converting {checkpoint} with {hparams} failed: {err}") from err
    shutil.rmtree(check, ignore_errors=True)
    source = repo_id or "<this folder>"
    card = ["---\nlibrary_name: speechbrain\ntags:\n- audio-source-separation\n- speechbrain\n---",
            "# MossFormer2", "",
            f"MossFormer2 speech separation (Zhao et al., ICASSP 2024), {sizes['num_spks']} speakers, "
            f"{sep.hparams.sample_rate} Hz, N={sizes['N']}, {sizes['num_layers']} layers. Weights "
            f"converted from the ClearerVoice checkpoint `{os.path.basename(checkpoint)}` "
            "(MossFormer2_SS_16K); check the licence of the original weights before sharing.", "",
            "## Usage", "", "```python", "from modules.inference import Separator",
            f'sep = Separator.from_hparams(source="{source}", savedir="pretrained/mossformer2")',
            'est = sep.separate_file("mixture.wav", output_dir="separated/")  # [1, time, n_src]',
            "```", "", "`modules` is the recipe collection that converted this model.", ""]
    with open(os.path.join(hub_folder, "README.md"), "w") as f:
        f.write("\n".join(card))
    return hub_folder


def push(hub_folder: str, repo_id: str):
    """Upload the folder to the Hugging Face Hub (needs a token: ``huggingface-cli login``)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=hub_folder, repo_id=repo_id)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_folder", help="training output folder (holds hyperparams.yaml, save/); "
                   "with --from-clearvoice, the ClearerVoice checkpoint file")
    p.add_argument("hub_folder", help="folder to write")
    p.add_argument("--hparams", default=None, help="inference yaml (default: hparams/<experiment>.yaml)")
    p.add_argument("--push", default=None, metavar="REPO_ID", help="upload to this Hub repository")
    p.add_argument("--deploy", action="store_true",
                   help="also write model.torchscript.pt and model.onnx, checked against PyTorch")
    p.add_argument("--from-clearvoice", action="store_true",
                   help="convert a ClearerVoice MossFormer2_SS_16K checkpoint (first argument)")
    a = p.parse_args(argv)
    if a.from_clearvoice:
        folder = export_clearvoice(a.output_folder, a.hub_folder, a.hparams, a.push)
    else:
        folder = export(a.output_folder, a.hub_folder, a.hparams, a.push)
    print(f"wrote {os.path.abspath(folder)} (hyperparams.yaml, model.ckpt, README.md)")
    if a.deploy:
        from .inference import Separator, interface_class

        interface = interface_class(os.path.join(folder, "hyperparams.yaml"))
        if interface is not Separator:
            print(f"error: --deploy (TorchScript + ONNX) covers separation models only, not "
                  f"{interface.__name__} models; {folder} was written without deployment files "
                  "and loads through the Pretrained interface", file=sys.stderr)
            return 2

        sep = Separator.from_hparams(source=os.path.abspath(folder),
                                     savedir=os.path.join(folder, ".check"))
        shutil.rmtree(os.path.join(folder, ".check"), ignore_errors=True)
        for name, diff in deploy(sep.mods.model, folder, sep.hparams.sample_rate).items():
            print(f"wrote {name}: max |difference| to PyTorch {diff:.1e} at "
                  f"{deployment_lengths(sep.hparams.sample_rate)} samples")
    if a.push:
        push(folder, a.push)
        print(f"uploaded to https://huggingface.co/{a.push}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
