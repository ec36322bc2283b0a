"""The top-level inference yaml loads a recipe checkpoint and reproduces the trained model."""

import os

import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import ROOT


def test_inference_yaml_loads_recipe_weights(tmp_path):
    with open(os.path.join(ROOT, "recipes/separation/hparams/convtasnet-small.yaml")) as f:
        trained = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "run")})["model"]
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(trained.state_dict(), folder / "model.ckpt")
    with open(os.path.join(ROOT, "hparams/convtasnet-small.yaml")) as f:
        hp = load_hyperpyyaml(f)
    pre = hp["pretrainer"]
    pre.set_collect_in(str(tmp_path / "collected"))
    pre.collect_files(default_source=str(folder))
    pre.load_collected()
    x = torch.randn(1, 4000)
    trained.eval()
    hp["model"].eval()
    with torch.no_grad():
        assert torch.equal(hp["model"](x), trained(x))
