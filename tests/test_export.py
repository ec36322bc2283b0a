"""Training folder -> Hugging Face folder -> Separator, with the same outputs; push up to upload."""

import os

import pytest
import torch

from conftest import ROOT, inference_yaml
from modules.serving.export import export, main as export_main
from modules.serving.inference import Separator
from modules.models.convtasnet import ConvTasNet
from test_recipes import SMALL_DATA, TINY_MODEL, run_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    out = base / "train"
    yaml = os.path.join(ROOT, "recipes", "separation", "hparams", "convtasnet-small.yaml")
    run_recipe("train.py", yaml, out, "--number_of_epochs=1", f"--cache_folder={base / 'cache'}",
               *SMALL_DATA, *TINY_MODEL)
    inference_yaml_path = base / "tiny.yaml"
    inference_yaml_path.write_text(inference_yaml())
    return out, inference_yaml_path


def test_export_round_trip(trained, tmp_path):
    out, yaml_path = trained
    hub = tmp_path / "hub"
    export(str(out), str(hub), hparams=str(yaml_path))
    assert sorted(os.listdir(hub)) == ["README.md", "hyperparams.yaml", "model.ckpt"]
    card = (hub / "README.md").read_text()
    assert "SI-SNRi" in card and "Separator.from_hparams" in card and "not real speech" in card
    ckpt = [d for d in os.listdir(out / "save") if d.startswith("CKPT+")][0]
    model = ConvTasNet(N=16, L=16, B=16, H=32, Sc=16, X=2, R=1).eval()
    model.load_state_dict(torch.load(out / "save" / ckpt / "model.ckpt", weights_only=True))
    sep = Separator.from_hparams(source=str(hub), savedir=str(tmp_path / "loaded"))
    x = torch.randn(1, 5000)
    with torch.no_grad():
        assert torch.equal(sep.separate_batch(x), model(x))


def test_export_refuses_mismatched_architecture(trained, tmp_path):
    out, _ = trained
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "notes.txt").write_text("the user's own file")
    with pytest.raises(RuntimeError, match="do not fit"):
        export(str(out), str(hub), hparams=os.path.join(ROOT, "hparams", "convtasnet-small.yaml"))
    assert os.listdir(hub) == ["notes.txt"]  # nothing half-made left, nothing of the user's lost


def test_push_uploads_the_checked_folder(trained, tmp_path, monkeypatch):
    out, yaml_path = trained
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path))))

    from modules.serving import export as export_module

    monkeypatch.setattr(export_module, "HfApi", FakeApi)
    status = export_main([str(out), str(tmp_path / "hub"), "--hparams", str(yaml_path),
                          "--push", "me/tiny-tasnet"])
    assert status == 0
    assert calls == [("create", "me/tiny-tasnet", True),  # private unless --public
                     ("upload", "me/tiny-tasnet", ["README.md", "hyperparams.yaml", "model.ckpt"])]
    assert 'source="me/tiny-tasnet"' in (tmp_path / "hub" / "README.md").read_text()


@pytest.mark.parametrize("norm,causal", [("gLN", False), ("cLN", True)])
def test_torchscript_and_onnx_match_pytorch_at_any_length(tmp_path, norm, causal):
    import onnxruntime as ort

    from modules.serving.export import deploy

    torch.manual_seed(0)
    model = ConvTasNet(N=32, L=16, B=32, H=64, Sc=32, X=3, R=2, norm=norm, causal=causal).eval()
    report = deploy(model, str(tmp_path), sample_rate=8000)
    assert set(report) == {"model.torchscript.pt", "model.onnx"}
    assert all(diff <= 1e-4 for diff in report.values())
    scripted = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    # lengths other than those deploy() checked: one frame + 1, odd, a multiple of the hop
    for batch, n in [(1, 17), (3, 999), (1, 16000), (2, 24008)]:
        x = 0.1 * torch.randn(batch, n)
        with torch.no_grad():
            ref = model(x)
        onnx_out = torch.from_numpy(sess.run(None, {"mix": x.numpy()})[0])
        assert onnx_out.shape == ref.shape == (batch, n, 2)
        assert (onnx_out - ref).abs().max() <= 1e-4
        assert torch.allclose(scripted(x), ref, atol=1e-6)


def test_deploy_reports_a_mismatch(tmp_path, monkeypatch):
    from modules.serving import export as export_module

    model = ConvTasNet(N=16, L=16, B=16, H=32, Sc=16, X=2, R=1).eval()
    with pytest.raises(RuntimeError, match="differs from PyTorch"):  # tolerance no export meets
        export_module.deploy(model, str(tmp_path), sample_rate=8000, tol=-1.0)
    assert not {"model.torchscript.pt", "model.onnx"} & set(os.listdir(tmp_path))  # none left behind


def test_export_cli_writes_deployment_files(trained, tmp_path):
    out, yaml_path = trained
    hub = tmp_path / "hub"
    assert export_main([str(out), str(hub), "--hparams", str(yaml_path), "--deploy"]) == 0
    assert sorted(os.listdir(hub)) == ["README.md", "hyperparams.yaml", "model.ckpt",
                                       "model.onnx", "model.torchscript.pt"]
    sep = Separator.from_hparams(source=str(hub), savedir=str(tmp_path / "loaded"))
    x = torch.randn(1, 3001)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(hub / "model.torchscript.pt"))(x),
                              sep.separate_batch(x), atol=1e-6)


def test_export_warns_about_a_model_that_makes_mixtures_worse(trained, tmp_path, capsys):
    import json
    import shutil

    out, yaml_path = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    summary = json.loads((run / "test_summary.json").read_text())
    summary["si-snr_i"] = -18.0
    (run / "test_summary.json").write_text(json.dumps(summary))
    assert export_main([str(run), str(tmp_path / "hub")]) == 0
    assert "SI-SNRi is -18.00 dB" in capsys.readouterr().err
    summary["si-snr_i"] = 3.0
    (run / "test_summary.json").write_text(json.dumps(summary))
    assert export_main([str(run), str(tmp_path / "hub2")]) == 0
    assert "warning" not in capsys.readouterr().err
