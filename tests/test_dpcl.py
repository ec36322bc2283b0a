"""Deep clustering for speech: its training loss and k-means masks."""

import torch

from modules.models.clustering import deep_clustering_loss
from modules.models.losses import pairwise_si_snr
from modules.models.stft_mask import DeepClusteringNet, ideal_mask_separation


def sources(seconds=1.0, sr=8000):
    t = torch.arange(int(seconds * sr)) / sr
    a = torch.sin(2 * torch.pi * 220 * t) * (1 + torch.sin(2 * torch.pi * 3 * t))
    b = torch.sign(torch.sin(2 * torch.pi * 1300 * t)) * 0.3
    return torch.stack([a, b], -1)[None]                 # [1, time, 2]


def test_training_loss_is_the_deep_clustering_loss_and_trains():
    torch.manual_seed(0)
    net = DeepClusteringNet(hidden=16, layers=1, emb_dim=6)
    src = sources()
    mix = src.sum(-1)
    loss = net(mix, src)
    spec = net.encoder(mix)
    owner = net.encoder(src[0].T).abs().argmax(0).T.flatten()[None]     # [1, T*F]
    expected = deep_clustering_loss(net.masker.embed(spec), owner, net.masker.active(spec).float())
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_perfect_embeddings_give_the_ideal_binary_mask():
    net = DeepClusteringNet(hidden=8, layers=1, emb_dim=2)
    src = sources()
    mix = src.sum(-1)
    spec = net.encoder(mix)
    owner = net.encoder(src[0].T).abs().argmax(0)                       # [F, T]
    onehot = torch.nn.functional.one_hot(owner.T.flatten(), 2).float()[None]
    masks = net.masker.cluster(spec, onehot)                            # k-means on one-hot units
    est = net.decode(net.apply_masks(spec, masks), mix.shape[-1])
    ibm = ideal_mask_separation(mix[0], src[0], "ibm")
    assert est.shape == (1, mix.shape[-1], 2)
    sim = pairwise_si_snr(est, ibm[None])[0]                             # [est, ref]
    best = max(sim[0, 0] + sim[1, 1], sim[0, 1] + sim[1, 0]) / 2
    assert best > 40  # the same signals up to the output order
