"""The top-level inference yaml + a recipe checkpoint make a folder that Separator loads."""

import os
import shutil

import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import ROOT
from modules.inference import Separator


def test_hub_folder_from_recipe_weights(tmp_path):
    with open(os.path.join(ROOT, "recipes/separation/hparams/convtasnet-small.yaml")) as f:
        trained = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "run")})["model"]
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(trained.state_dict(), folder / "model.ckpt")  # what the recipe checkpoint holds
    shutil.copy(os.path.join(ROOT, "hparams/convtasnet-small.yaml"), folder / "hyperparams.yaml")
    sep = Separator.from_hparams(source=str(folder), savedir=str(tmp_path / "saved"))
    x = torch.randn(1, 4000)
    trained.eval()
    with torch.no_grad():
        assert torch.equal(sep.separate_batch(x), trained(x))
