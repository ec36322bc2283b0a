#!/usr/bin/env python3
"""SpeechBrain's Conv-TasNet lobes trained by our separation recipe: the peer of a recipe figure.

    .venv/bin/python bench/peer_convtasnet.py --data_folder="[../shared/data/LibriSpeech, ../shared/data/speechocean762]" \
        --max_train_minutes=30 --output_folder=results/sep/peer-speechbrain

The run is ``recipes/separation/train.py recipes/separation/hparams/convtasnet-small.yaml`` with
only the model replaced: SpeechBrain's ``conv_tasnet.MaskNet`` between its ``dual_path.Encoder``
and ``dual_path.Decoder`` (:class:`SpeechBrainLobes`), wired as SpeechBrain's WSJ0-2mix Conv-TasNet
recipe wires them, with the yaml's sizes (N, L, B, H, P, X, R; SpeechBrain's TCN has no skip
path, so no Sc). Data, budget, loss, schedule, validation and test mixtures are the recipe's, so
the test summary stands next to our model's run with the same arguments. Every other argument
is passed to the recipe (``--max_train_minutes``, ``--data_folder``, ``--output_folder``, ...).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from modules.models.base import EncoderMaskerDecoder  # noqa: E402

RECIPE_YAML = os.path.join(ROOT, "recipes", "separation", "hparams", "convtasnet-small.yaml")

PEER_MODEL = """model: !new:bench.peer_convtasnet.SpeechBrainLobes
    N: !ref <N>
    L: !ref <L>
    B: !ref <B>
    H: !ref <H>
    P: !ref <P>
    X: !ref <X>
    R: !ref <R>
    n_src: !ref <num_spks>
"""


class SpeechBrainLobes(EncoderMaskerDecoder):
    """SpeechBrain's Conv-TasNet: ``dual_path.Encoder`` (N filters of L samples, hop L/2, ReLU),
    ``conv_tasnet.MaskNet`` (gLN, ReLU masks, no skip path) and ``dual_path.Decoder`` called
    once per source. ``mix [batch, time]`` -> ``[batch, time, n_src]``; trains with the
    skeleton's PIT SI-SNR objective."""

    def __init__(self, N=128, L=40, B=128, H=256, P=3, X=7, R=2, n_src=2):
        from speechbrain.lobes.models.conv_tasnet import MaskNet
        from speechbrain.lobes.models.dual_path import Decoder, Encoder

        super().__init__(Encoder(kernel_size=L, out_channels=N),
                         MaskNet(N, B, H, P, X, R, n_src, norm_type="gLN", causal=False, mask_nonlinear="relu"),
                         Decoder(in_channels=N, out_channels=1, kernel_size=L, stride=L // 2, bias=False))
        self._n_src = n_src

    @property
    def n_src(self) -> int:
        return self._n_src

    def separate(self, mix: torch.Tensor) -> torch.Tensor:
        w = self.encoder(mix)                       # [batch, N, frames]
        masks = self.masker(w)                      # [n_src, batch, N, frames]
        est = torch.stack([self.decoder(w * masks[i]) for i in range(self._n_src)], -1)
        t = mix.shape[-1]
        return F.pad(est, (0, 0, 0, t - est.shape[1])) if est.shape[1] < t else est[:, :t]


def peer_yaml() -> str:
    """The recipe's yaml text with its ``model:`` section replaced by :class:`SpeechBrainLobes`."""
    with open(RECIPE_YAML) as f:
        text = f.read()
    section = re.compile(r"^model: .*?(?=^\S)", re.M | re.S)
    if not section.search(text):
        raise RuntimeError(f"{RECIPE_YAML} has no top-level 'model:' section to replace")
    text = section.sub(PEER_MODEL, text, count=1)
    return text.replace("experiment_name: convtasnet-small", "experiment_name: convtasnet-small-speechbrain-lobes")


def main(argv=None):
    spec = importlib.util.spec_from_file_location("separation_train", os.path.join(ROOT, "recipes", "separation", "train.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "convtasnet-small-speechbrain-lobes.yaml")
        with open(path, "w") as f:
            f.write(peer_yaml())
        return recipe.run([path] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
