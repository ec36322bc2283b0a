"""Turn a training output folder into a Hugging Face model folder, and optionally upload it.

    python -m modules.serving.export <training output folder> <hub folder> [--hparams <inference yaml>]
                             [--push <user/repo> [--public]] [--deploy] [--weights ckpt|safetensors]
    python -m modules.serving.export --from-clearvoice <ClearerVoice MossFormer2_SS_16K checkpoint> <hub folder>

The hub folder gets ``hyperparams.yaml``, the weights of the best complete checkpoint by the
recipe's ``valid_metric`` (``model.safetensors`` by default, or ``model.ckpt``, a plain state dict
that loads with ``weights_only=True``) and a model card ``README.md`` written by the interface
that serves the model.

``hyperparams.yaml`` is derived from the run, read and written as YAML: the run's resolved
``model`` section (every option the run was trained with, command-line overrides included), its
``sample_rate`` and ``num_spks``, the inference settings of the interface that the training yaml
names (``interface:``; :class:`~modules.serving.inference.Separator` when there is none) and the
``modules`` / ``pretrainer`` entries that load the weights. ``--hparams`` uses a hand-written
inference yaml instead. The folder is loaded back through that interface before anything is
uploaded, and the weights must fit its model exactly.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys

import torch
from huggingface_hub import HfApi
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from safetensors.torch import save_file

from modules.convert.clearvoice import clearvoice_config, load_clearvoice_checkpoint, read_clearvoice_state_dict
from modules.serving.inference import INFERENCE_SETTINGS, Separator, interface_class
from modules.training.brain import best_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEIGHT_FILES = {"ckpt": "model.ckpt", "safetensors": "model.safetensors"}
#: test-summary improvements over the mixture; below 0 dB the model makes its input worse
IMPROVEMENT_KEYS = {"si-snr_i": "SI-SNRi", "si-sdr_i": "SI-SDRi"}


def quality_warning(summary) -> str | None:
    """A warning when the run's test set says the model makes mixtures worse, else None."""
    for key in IMPROVEMENT_KEYS:
        value = (summary or {}).get(key)
        if isinstance(value, (int, float)) and value < 0:
            return (f"the run's test {IMPROVEMENT_KEYS[key]} is {value:.2f} dB: the "
                    "model makes its input worse than the mixture; train longer before sharing")
    return None


def _yaml() -> YAML:
    y = YAML()  # round trip: keeps tags (!new:, !ref), key order and comments
    y.indent(mapping=4, sequence=4, offset=2)
    return y


def read_yaml(path: str):
    with open(path, encoding="utf-8") as f:
        return _yaml().load(f)


def dump_yaml(doc) -> str:
    out = io.StringIO()
    _yaml().dump(doc, out)
    return out.getvalue()


# how an exported folder loads its weights (model.safetensors or model.ckpt)
LOADING = """
modules:
    model: !ref <model>
pretrainer: !new:modules.serving.inference.WeightsPretrainer
    loadables:
        model: !ref <model>
"""


def inference_hparams(run) -> CommentedMap:
    """The inference yaml of a training run (its resolved ``hyperparams.yaml``, loaded): the
    interface, rates, the interface's settings, the run's ``model`` section, ``modules`` and the
    ``pretrainer`` that loads ``model``'s weights."""
    if "model" not in run:
        raise KeyError("the run's hyperparams.yaml has no top-level 'model:' section to export")
    doc = CommentedMap()
    doc["interface"] = str(run.get("interface") or f"{Separator.__module__}.{Separator.__name__}")
    for key in ("sample_rate", "num_spks"):
        if key in run:
            doc[key] = run[key]
    for key, default in INFERENCE_SETTINGS.items():
        doc[key] = run.get(key, default)
    doc["model"] = run["model"]
    if getattr(doc["model"], "anchor", None) is not None:
        doc["model"].anchor.value = None
    loading = _yaml().load(LOADING)
    doc["modules"], doc["pretrainer"] = loading["modules"], loading["pretrainer"]
    doc.yaml_set_start_comment(
        "Inference hyperparameters written by modules.serving.export from a training run: the\n"
        "run's model section as trained. Loaded by the interface named below.")
    return doc


def remove_written(hub_folder: str):
    """Delete what an export wrote into ``hub_folder`` (and only that): nothing half-made is left,
    and none of the user's own files are touched."""
    for written in ("hyperparams.yaml", *WEIGHT_FILES.values(), ".check"):
        path = os.path.join(hub_folder, written)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def export(output_folder: str, hub_folder: str, hparams: str | None = None,
           repo_id: str | None = None, weights: str | None = None, licence: str = "apache-2.0") -> str:
    """Write the hub folder; returns its path. See the module docstring. ``weights``: ``ckpt``
    or ``safetensors``; by default safetensors, unless a hand-written ``hparams`` loads its
    weights with SpeechBrain's own ``Pretrainer``, which reads ``model.ckpt`` only."""
    saved = os.path.join(output_folder, "hyperparams.yaml")
    if not os.path.exists(saved):
        raise FileNotFoundError(f"{saved} not found: is {output_folder} a training output folder?")
    run = read_yaml(saved)
    name = str(run.get("experiment_name") or "model")
    metric = str(run.get("valid_metric") or "si-snr")
    ckpt = best_checkpoint(os.path.join(output_folder, "save"), metric,
                           str(run.get("valid_metric_mode") or "max"))
    if hparams:
        if not os.path.exists(hparams):
            raise FileNotFoundError(f"no inference yaml {hparams}")
        with open(hparams, encoding="utf-8") as f:
            text = f.read()
    else:
        text = dump_yaml(inference_hparams(run))
    if weights is None:
        weights = "safetensors" if "WeightsPretrainer" in str(_yaml().load(text)["pretrainer"].tag) else "ckpt"
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    os.makedirs(hub_folder, exist_ok=True)
    for other in WEIGHT_FILES.values():  # one weight file per folder: the loader takes either
        if os.path.exists(os.path.join(hub_folder, other)):
            os.remove(os.path.join(hub_folder, other))
    with open(os.path.join(hub_folder, "hyperparams.yaml"), "w", encoding="utf-8") as f:
        f.write(text)
    state = torch.load(os.path.join(ckpt, "model.ckpt"), map_location="cpu", weights_only=True)
    weight_path = os.path.join(hub_folder, WEIGHT_FILES[weights])
    if weights == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, weight_path)
    else:
        torch.save(state, weight_path)
    interface = interface_class(os.path.join(hub_folder, "hyperparams.yaml"))
    try:  # load the folder back as a user will, and insist on an exact fit of every weight
        loaded = interface.from_hparams(source=os.path.abspath(hub_folder),
                                        savedir=os.path.join(hub_folder, ".check"))
        loaded.mods.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        remove_written(hub_folder)
        raise RuntimeError(f"the weights of {ckpt} do not fit the model of the exported "
                           f"hyperparams.yaml ({err})") from err
    shutil.rmtree(os.path.join(hub_folder, ".check"), ignore_errors=True)
    summary = None
    summary_path = os.path.join(output_folder, "test_summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    card = interface.model_card(name=name, run=run, summary=summary, repo_id=repo_id,
                                licence=licence, hparams=loaded.hparams,
                                files=sorted(os.listdir(hub_folder)))
    with open(os.path.join(hub_folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
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
    needs inputs longer than one encoder frame (pad shorter ones with zeros). On failure no
    deployment file is left in ``folder``."""
    model = model.eval().cpu()
    lengths = deployment_lengths(sample_rate)
    os.makedirs(folder, exist_ok=True)
    ts_path, onnx_path = os.path.join(folder, "model.torchscript.pt"), os.path.join(folder, "model.onnx")
    try:
        return _write_deployment(model, ts_path, onnx_path, lengths, tol)
    except Exception:
        for path in (ts_path, onnx_path):  # no half-written deployment is left behind
            if os.path.exists(path):
                os.remove(path)
        raise


def _write_deployment(model, ts_path, onnx_path, lengths, tol) -> dict:
    import onnxruntime as ort

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
    """``text`` (a yaml) with the top-level keys of ``values`` set, read and written as YAML
    (comments and tags kept); a key that the yaml does not have is an error."""
    doc = _yaml().load(text)
    for key, value in values.items():
        if key not in doc:
            raise KeyError(f"the inference yaml has no top-level '{key}:' key to set")
        doc[key] = value
    return dump_yaml(doc)


def export_clearvoice(checkpoint: str, hub_folder: str, hparams: str | None = None,
                      repo_id: str | None = None) -> str:
    """Convert a ClearerVoice ``MossFormer2_SS_16K`` checkpoint into a hub folder; returns it.

    The sizes are read off the checkpoint and written into ``hparams/mossformer2.yaml`` (or
    ``hparams``), the weights are renamed to ours (:mod:`modules.models.mossformer2`; every key must
    fit), and the folder is loaded back through :class:`modules.serving.inference.Separator`, which
    must give exactly the output of the converted model.
    """
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
            "## Usage", "", "```python", "from modules.serving.inference import Separator",
            f'sep = Separator.from_hparams(source="{source}", savedir="pretrained/mossformer2")',
            'est = sep.separate_file("mixture.wav", output_dir="separated/")  # [1, time, n_src]',
            "```", "", "`modules` is the recipe collection that converted this model.", ""]
    with open(os.path.join(hub_folder, "README.md"), "w") as f:
        f.write("\n".join(card))
    return hub_folder


def push(hub_folder: str, repo_id: str, private: bool = True):
    """Upload the folder to the Hugging Face Hub (needs a token: ``huggingface-cli login``); a
    new repository is private unless ``private=False``."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private)
    api.upload_folder(folder_path=hub_folder, repo_id=repo_id)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_folder", help="training output folder (holds hyperparams.yaml, save/); "
                   "with --from-clearvoice, the ClearerVoice checkpoint file")
    p.add_argument("hub_folder", help="folder to write")
    p.add_argument("--hparams", default=None,
                   help="a hand-written inference yaml to use instead of the one derived from the run")
    p.add_argument("--weights", choices=sorted(WEIGHT_FILES), default=None,
                   help="weight file format (default: safetensors; ckpt when --hparams loads "
                   "through SpeechBrain's own Pretrainer)")
    p.add_argument("--license", dest="licence", default="apache-2.0",
                   help="licence named in the model card (default: apache-2.0)")
    p.add_argument("--push", default=None, metavar="REPO_ID", help="upload to this Hub repository")
    p.add_argument("--public", action="store_true",
                   help="with --push: create the repository public (default: private)")
    p.add_argument("--deploy", action="store_true",
                   help="also write model.torchscript.pt and model.onnx, checked against PyTorch")
    p.add_argument("--from-clearvoice", action="store_true",
                   help="convert a ClearerVoice MossFormer2_SS_16K checkpoint (first argument)")
    a = p.parse_args(argv)
    try:
        if a.from_clearvoice:
            folder = export_clearvoice(a.output_folder, a.hub_folder, a.hparams, a.push)
        else:
            folder = export(a.output_folder, a.hub_folder, a.hparams, a.push, a.weights, a.licence)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(folder)} ({', '.join(sorted(os.listdir(folder)))})")
    summary_path = os.path.join(a.output_folder, "test_summary.json")
    if not a.from_clearvoice and os.path.exists(summary_path):
        with open(summary_path) as f:
            warning = quality_warning(json.load(f))
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if a.deploy:
        interface = interface_class(os.path.join(folder, "hyperparams.yaml"))
        if interface is not Separator:
            print(f"error: --deploy (TorchScript + ONNX) covers separation models only, not "
                  f"{interface.__name__} models; {folder} was written without deployment files "
                  "and loads through the Pretrained interface", file=sys.stderr)
            return 2

        sep = Separator.from_hparams(source=os.path.abspath(folder),
                                     savedir=os.path.join(folder, ".check"))
        shutil.rmtree(os.path.join(folder, ".check"), ignore_errors=True)
        try:
            report = deploy(sep.mods.model, folder, sep.hparams.sample_rate)
        except RuntimeError as err:
            reason = " ".join([line.strip() for line in str(err).splitlines() if line.strip()][:2])
            print(f"error: --deploy failed: {reason[:400]}\n{folder} was written without deployment "
                  "files and loads through the Pretrained interface", file=sys.stderr)
            return 2
        for name, diff in report.items():
            print(f"wrote {name}: max |difference| to PyTorch {diff:.1e} at "
                  f"{deployment_lengths(sep.hparams.sample_rate)} samples")
    if a.push:
        push(folder, a.push, private=not a.public)
        print(f"uploaded to https://huggingface.co/{a.push} ({'public' if a.public else 'private'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
