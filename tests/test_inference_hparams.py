"""Each top-level inference yaml + its recipe's checkpoint make a folder that Separator loads."""

import glob
import os
import shutil

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import ROOT
from modules.inference import Separator


INFERENCE_YAMLS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "hparams", "*.yaml")))


def test_every_inference_yaml_has_its_recipe():
    for name in INFERENCE_YAMLS:
        assert os.path.exists(os.path.join(ROOT, "recipes/separation/hparams", name)), name


@pytest.mark.parametrize("name", INFERENCE_YAMLS)
def test_hub_folder_from_recipe_weights(tmp_path, name):
    with open(os.path.join(ROOT, "recipes/separation/hparams", name)) as f:
        trained = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "run")})["model"]
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(trained.state_dict(), folder / "model.ckpt")  # what the recipe checkpoint holds
    shutil.copy(os.path.join(ROOT, "hparams", name), folder / "hyperparams.yaml")
    sep = Separator.from_hparams(source=str(folder), savedir=str(tmp_path / "saved"))
    x = torch.randn(1, 4000)
    trained.eval()
    with torch.no_grad():
        assert torch.equal(sep.separate_batch(x), trained(x))
