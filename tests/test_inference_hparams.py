"""Each top-level inference yaml + its recipe's checkpoint make a folder that Separator loads."""

import glob
import os
import shutil

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import ROOT
from modules.serving.inference import Separator, interface_class


INFERENCE_YAMLS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "hparams", "*.yaml")))


def recipe_yaml(name):
    found = glob.glob(os.path.join(ROOT, "recipes", "*", "hparams", name))
    assert len(found) == 1, f"{name}: expected one recipe yaml of that name, found {found}"
    return found[0]


def test_every_inference_yaml_has_its_recipe():
    for name in INFERENCE_YAMLS:
        recipe_yaml(name)


@pytest.mark.parametrize("name", INFERENCE_YAMLS)
def test_hub_folder_from_recipe_weights(tmp_path, name):
    with open(recipe_yaml(name)) as f:
        trained = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "run")})["model"]
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(trained.state_dict(), folder / "model.ckpt")  # what the recipe checkpoint holds
    shutil.copy(os.path.join(ROOT, "hparams", name), folder / "hyperparams.yaml")
    interface = interface_class(os.path.join(ROOT, "hparams", name))
    loaded = interface.from_hparams(source=str(folder), savedir=str(tmp_path / "saved"))
    x = torch.randn(1, 16000)
    trained.eval()
    with torch.no_grad():
        if interface is Separator:
            assert torch.equal(loaded.separate_batch(x), trained(x))
        else:  # models with several outputs (e.g. TimbreNet: posteriors and embeddings)
            ours, theirs = loaded.mods.model(x), trained(x)
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)
