"""Conv-TasNet maths: shapes, norms, causality and receptive fields of every config."""

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import ROOT
from modules.models.base import ChannelLayerNorm, CumulativeLayerNorm, GlobalLayerNorm
from modules.models.convtasnet import TCN, ConvTasNet, receptive_field

TINY = dict(N=16, L=8, B=8, H=16, Sc=8, P=3, X=3, R=2)
CONFIGS = {
    "convtasnet-small": dict(N=128, L=40, B=128, H=256, Sc=128, P=3, X=7, R=2),
    "convtasnet": dict(N=512, L=16, B=128, H=512, Sc=128, P=3, X=8, R=3),
}


@pytest.mark.parametrize("length", [1, 7, 8, 9, 100, 1001])
@pytest.mark.parametrize("n_src", [2, 3])
def test_shapes_any_length(length, n_src):
    model = ConvTasNet(**TINY, n_src=n_src)
    out = model(torch.randn(2, length))
    assert out.shape == (2, length, n_src)
    assert torch.isfinite(out).all()


def test_global_layer_norm_statistics():
    x = 3 + 2 * torch.randn(4, 6, 50)
    y = GlobalLayerNorm(6)(x)
    for b in range(4):
        assert y[b].mean().abs() < 1e-5
        assert (y[b].var(unbiased=False) - 1).abs() < 1e-3


def test_cumulative_layer_norm_matches_loop():
    x = torch.randn(2, 5, 30, dtype=torch.float64)
    norm = CumulativeLayerNorm(5).double()
    y = norm(x)
    for k in range(30):
        past = x[:, :, : k + 1]
        mean = past.mean(dim=(1, 2), keepdim=True)
        var = past.var(dim=(1, 2), unbiased=False, keepdim=True)
        expected = (x[:, :, k : k + 1] - mean) / torch.sqrt(var + norm.eps)
        assert torch.allclose(y[:, :, k : k + 1], expected, atol=1e-8)


def test_channel_layer_norm_per_frame():
    y = ChannelLayerNorm(6)(5 + torch.randn(2, 6, 9))
    assert torch.allclose(y.mean(1), torch.zeros(2, 9), atol=1e-5)


def test_causal_model_ignores_the_future():
    torch.manual_seed(0)
    model = ConvTasNet(**TINY, norm="cLN", causal=True).eval()
    x = torch.randn(1, 400)
    y = x.clone()
    y[:, 200:] = torch.randn(200)
    a, b = model(x), model(y)
    # samples before the first changed frame are unaffected
    assert torch.allclose(a[:, :190], b[:, :190], atol=1e-6)
    assert not torch.allclose(a[:, 200:], b[:, 200:])


def test_causal_requires_causal_norm():
    with pytest.raises(ValueError, match="cLN"):
        ConvTasNet(**TINY, causal=True, norm="gLN")


def _influence_span(model, length, t):
    """Indices of the input samples whose gradient on output sample t is non-zero."""
    x = torch.randn(1, length, requires_grad=True)
    model(x)[0, t].sum().backward()
    nz = (x.grad[0] != 0).nonzero().flatten()
    return int(nz.min()), int(nz.max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_receptive_field_of_each_config(name):
    """The TCN sees 1 + R * sum_x (P-1) 2^x frames; measured with per-frame norms (gLN mixes
    all frames through its statistics, which is not receptive field)."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    tcn = TCN(cfg["N"], cfg["B"], cfg["H"], cfg["Sc"], cfg["P"], cfg["X"], cfg["R"], norm="chLN")
    frames = tcn.receptive_field_frames()
    assert frames == 1 + cfg["R"] * (cfg["P"] - 1) * (2 ** cfg["X"] - 1)
    w = torch.randn(1, cfg["N"], frames + 200, requires_grad=True)
    t = w.shape[-1] // 2
    tcn(w)[0, :, :, t].sum().backward()
    nz = (w.grad[0].abs().sum(0) != 0).nonzero().flatten()
    assert int(nz.max() - nz.min()) + 1 == frames
    assert int(nz.min()) == t - (frames - 1) // 2  # centred (non-causal)
    # whole model, in samples
    model = ConvTasNet(**cfg, norm="chLN")
    stride = model.encoder.stride
    lo, hi = _influence_span(model, (frames + 40) * stride, ((frames + 40) * stride) // 2)
    assert hi - lo + 1 == receptive_field(model)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_recipe_yaml_builds_the_paper_config(name):
    with open(f"{ROOT}/recipes/separation/hparams/{name}.yaml") as f:
        hp = load_hyperpyyaml(f)
    ref = ConvTasNet(**CONFIGS[name])
    got = hp["model"]
    assert [p.shape for p in got.parameters()] == [p.shape for p in ref.parameters()]
    n = sum(p.numel() for p in got.parameters()) / 1e6
    assert n == pytest.approx({"convtasnet-small": 1.44, "convtasnet": 4.98}[name], abs=0.01)


def _reference_gln(norm, x):
    """gLN as written in the paper, on ``[batch, C, frames]``."""
    mean = x.mean(dim=(1, 2), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(1, 2), keepdim=True)
    return norm.gamma * (x - mean) / torch.sqrt(var + norm.eps) + norm.beta


def _reference_tcn(tcn, w):
    """The TCN (gLN, non-causal) step by step with channels-first convolutions."""
    prelu = lambda act, x: torch.where(x >= 0, x, act.weight * x)
    x = tcn.bottleneck(_reference_gln(tcn.in_norm, w))
    skip_sum = 0
    for block in tcn.blocks:
        y = _reference_gln(block.norm1, prelu(block.act1, block.conv_in(x)))
        y = block.dconv(torch.nn.functional.pad(y, (block.pad // 2, block.pad - block.pad // 2)))
        y = _reference_gln(block.norm2, prelu(block.act2, y))
        skip_sum = skip_sum + block.skip_conv(y)
        if block.res_conv is not None:
            x = x + block.res_conv(y)
    m = tcn.mask_conv(prelu(tcn.out_act, skip_sum))
    return torch.relu(m.view(w.shape[0], tcn.n_src, tcn.N, w.shape[-1]))


def _perturbed_model(cfg, dtype=torch.float32):
    """A seeded model whose norm gains, biases and PReLU slopes are not at their initial values."""
    torch.manual_seed(0)
    model = ConvTasNet(**cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "act" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["onednn-fused", "plain"])
@pytest.mark.parametrize("cfg", [CONFIGS["convtasnet-small"], dict(TINY, P=2)])
def test_tcn_matches_a_channels_first_reference(cfg, fused, monkeypatch):
    """The channels-last TCN (matrix products, channels-last depthwise convolution, two-pass gLN)
    computes the same masks and separation as the textbook channels-first computation, on
    oneDNN's fused inference kernels (taken: counted) and without them."""
    import modules.models.convtasnet as cts

    if fused and not cts._ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear kernels")
    monkeypatch.setattr(cts, "_ONEDNN_LINEAR", fused)
    calls, real = [], cts._linear_fused
    monkeypatch.setattr(cts, "_linear_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _perturbed_model(cfg).eval()
    mix = torch.randn(2, 4001)
    with torch.no_grad():
        w = model.encode(mix)
        masks = _reference_tcn(model.masker, w)
        ref = model.decode(model.apply_masks(w, masks), mix.shape[-1])
        assert (model.masker(w) - masks).abs().max() <= 1e-5
        assert (model(mix) - ref).abs().max() <= 1e-5
    blocks = cfg["X"] * cfg["R"]
    # per TCN call: the bottleneck, and 3 per block but the last block's residual; two calls
    assert len(calls) == (2 * 3 * blocks if fused else 0)


def test_training_gradients_match_the_reference():
    """In training mode the depthwise convolution and PReLU use hand-written backward passes;
    their gradients equal autograd's through the reference computation (float64)."""
    model = _perturbed_model(dict(TINY, P=3), torch.float64).train()
    w = torch.randn(2, TINY["N"], 90, dtype=torch.float64)
    target = torch.randn(2, 2, TINY["N"], 90, dtype=torch.float64)
    (model.masker(w) * target).sum().backward()
    got = {n: p.grad.clone() for n, p in model.masker.named_parameters()}
    model.zero_grad()
    (_reference_tcn(model.masker, w) * target).sum().backward()
    for n, p in model.masker.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-9, atol=1e-9), n
