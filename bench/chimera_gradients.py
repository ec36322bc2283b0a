#!/usr/bin/env python3
"""How strongly each Chimera++ loss pulls on the shared BLSTM at initialisation.

    python bench/chimera_gradients.py [--data ../shared/data/LibriSpeech] [--batch 4]
                                      [--seconds 2] [--seeds 0 1 2]

A batch of real two-speaker mixtures (0 dB, the held-out speakers of the recipe's split, as in
``bench/long_file.py``) goes through ``DeepClusteringNet`` with the sizes of
``recipes/separation/hparams/dpcl.yaml`` and a mask head, freshly initialised with each seed.
Printed per seed: the gradient norm on the BLSTM's weights of the deep-clustering loss and of the
mask head's loss (-PIT SI-SNR in dB), each at weight 1, their ratio, and the ``mi_weight`` that
would give both the same pull (``w / (1 - w) = DC / MI``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from long_file import build_tracks  # noqa: E402
from modules.models.stft_mask import DeepClusteringNet  # noqa: E402


def blstm_grad_norm(net: DeepClusteringNet, loss: torch.Tensor) -> float:
    params = list(net.masker.rnn.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "LibriSpeech")))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sample_rate", type=int, default=8000)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    seg = int(a.seconds * a.sample_rate)
    tracks = build_tracks(a.data, a.sample_rate, a.batch * a.seconds, quiet=True)   # [time, 2]
    sources = torch.stack([tracks[i * seg:(i + 1) * seg] for i in range(a.batch)])  # [B, seg, 2]
    mix = sources.sum(-1)
    print(f"# Chimera++ loss gradients on the BLSTM at initialisation, {a.batch} x {a.seconds:g} s "
          f"real mixtures ({a.data}), dpcl.yaml sizes, 1 thread")
    print("| seed | DC grad norm | MI grad norm | MI / DC | balancing mi_weight |")
    print("|---|---|---|---|---|")
    ratios = []
    for seed in a.seeds:
        torch.manual_seed(seed)
        net = DeepClusteringNet(hidden=300, layers=2, emb_dim=20, mi_weight=0.5)
        dc, mi = (loss.mean() for loss in net.losses(mix, sources))
        g_dc, g_mi = blstm_grad_norm(net, dc), blstm_grad_norm(net, mi)
        ratios.append(g_mi / g_dc)
        print(f"| {seed} | {g_dc:.3g} | {g_mi:.3g} | {g_mi / g_dc:.2f} | {g_dc / (g_dc + g_mi):.3f} |")
    mean = sum(ratios) / len(ratios)
    print(f"\nmean MI / DC = {mean:.2f}: mi_weight {1 / (1 + mean):.3f} gives both losses the same pull")


if __name__ == "__main__":
    main()
