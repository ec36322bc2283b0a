"""Deep clustering for speech: its training loss and k-means masks."""

import pytest
import torch

from modules.models.clustering import deep_clustering_loss
from modules.models.losses import pairwise_si_snr, pit_si_snr_loss
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


def test_chimera_loss_mixes_deep_clustering_and_the_mask_heads_si_snr():
    torch.manual_seed(0)
    net = DeepClusteringNet(hidden=16, layers=1, emb_dim=6, mi_weight=0.2)
    src = sources()
    mix = src.sum(-1)
    loss = net(mix, src)
    spec = net.encoder(mix)
    owner = net.encoder(src[0].T).abs().argmax(0).T.flatten()[None]
    dc = deep_clustering_loss(net.masker.embed(spec), owner, net.masker.active(spec).float())
    est = net(mix)                                          # inference: the mask head, no k-means
    mi = pit_si_snr_loss(est, src)
    assert torch.allclose(loss, 0.8 * dc + 0.2 * mi, atol=1e-5)
    loss.sum().backward()
    assert net.masker.mask_proj.weight.grad.abs().sum() > 0 and net.masker.proj.weight.grad.abs().sum() > 0
    # the mask head separates: its output is its sigmoid masks times the mixture spectrum
    masks = net.masker.masks(spec)
    assert ((masks > 0) & (masks < 1)).all()
    assert torch.allclose(est, net.decode(net.apply_masks(spec, masks), mix.shape[-1]), atol=1e-6)


def test_chimera_mask_head_learns_to_separate():
    torch.manual_seed(0)
    net = DeepClusteringNet(hidden=32, layers=1, emb_dim=4, mi_weight=0.5)
    src = sources(0.5)
    mix = src.sum(-1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        before = -pit_si_snr_loss(net(mix), src).item()
    for _ in range(60):
        opt.zero_grad()
        net(mix, src).sum().backward()
        opt.step()
    with torch.no_grad():
        after = -pit_si_snr_loss(net(mix), src).item()
    assert after > before + 10, (before, after)


@pytest.mark.parametrize("bad", [1.5, -0.1, 1.0, "0.2", True, None])
def test_a_bad_mi_weight_is_refused(bad):
    with pytest.raises(ValueError, match="mi_weight must be a number in"):
        DeepClusteringNet(hidden=8, layers=1, emb_dim=2, mi_weight=bad)


def test_deep_clustering_alone_has_no_mask_head():
    net = DeepClusteringNet(hidden=8, layers=1, emb_dim=2)
    assert not any(k.startswith("masker.mask_proj") for k in net.state_dict())
    with pytest.raises(RuntimeError, match="no mask head"):
        net.masker.masks(net.encoder(torch.randn(1, 800)))


def test_chimera_loss_ignores_the_order_of_the_sources_per_item():
    torch.manual_seed(0)
    net = DeepClusteringNet(hidden=16, layers=1, emb_dim=6, mi_weight=0.2)
    src = torch.cat([sources(), sources() * torch.tensor([0.5, 2.0])])  # two different mixtures
    mix = src.sum(-1)
    swapped = src.clone()
    swapped[1] = src[1].flip(-1)                              # the second item's sources swapped
    assert torch.allclose(net(mix, src), net(mix, swapped), atol=1e-5)
    one = net(mix[1:], src[1:])                               # each item's loss as when alone
    assert torch.allclose(net(mix, src)[1], one.reshape(()), atol=1e-4)


def test_the_clustering_blstm_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    net = DeepClusteringNet(hidden=16, layers=1, emb_dim=6, mi_weight=0.2)
    spec = net.encoder(sources().sum(-1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = net.masker.states(spec)
    assert h.dtype == torch.float32
    assert torch.allclose(h, net.masker.states(spec), atol=1e-6)
