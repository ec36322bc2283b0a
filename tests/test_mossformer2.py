"""MossFormer2: same outputs as the ClearerVoice reference code with the same weights, parameter
counts of the paper, ClearerVoice checkpoint loading (and its errors), Separator folders and
``modules.serving.export --from-clearvoice``.

The reference is ``clearvoice==0.1.2`` (requirements-ref.txt), imported from its files: the
package's ``__init__`` pulls in heavy dependencies that it does not need for the model.
"""

import os
import re
import types

import pytest
import torch
from hyperpyyaml import resolve_references

from clearvoice_ref import clearvoice_reference
from conftest import ROOT
from modules.convert.clearvoice import (CheckpointMismatchError, clearvoice_config, clearvoice_to_ours,
                                        load_clearvoice_checkpoint, ours_to_clearvoice)
from modules.models.mossformer2 import CONFIGS, MossFormer2

SR = 16000


@pytest.fixture(scope="module")
def reference():
    """The module clearvoice/models/mossformer2_ss/mossformer2.py, or a skip saying why."""
    try:
        return clearvoice_reference()
    except ImportError as err:
        pytest.skip(str(err))


def reference_model(reference, N, num_layers, seed=0, dtype=torch.float32):
    """``MossFormer2_SS_16K(args).model`` with seeded random weights. Parameters that start as
    constants (norm gains and biases, PReLU slopes, scales) are made to differ from each other,
    so that a swapped key cannot go unnoticed."""
    torch.manual_seed(seed)
    args = types.SimpleNamespace(encoder_embedding_dim=N, mossformer_sequence_dim=N,
                                 num_mossformer_layer=num_layers, encoder_kernel_size=16, num_spks=2)
    model = reference.MossFormer2_SS_16K(args).model.to(dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and bool((p == p.flatten()[0]).all()):
                noise = torch.randn(p.shape, generator=gen, dtype=dtype)
                p.copy_(p * (1 + 0.1 * noise) if p.flatten()[0] != 0 else 0.02 * noise)
    return model


def run_reference(model, x):
    """The reference returns a list of ``[batch, time]``; ours is ``[batch, time, n_src]``."""
    with torch.no_grad():
        return torch.stack(model(x), dim=-1)


def mix(seconds, batch=1, seed=0):
    return torch.randn(batch, int(round(seconds * SR)), generator=torch.Generator().manual_seed(seed))


# ---- parameter counts (no reference needed) -------------------------------------------------


@pytest.mark.parametrize("config, millions, exact", [("mossformer2", 55.7, 55_735_394),
                                                      ("mossformer2-s", 37.8, 37_755_366)])
def test_parameter_counts_of_the_paper(config, millions, exact):
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = MossFormer2(**CONFIGS[config])
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == millions
    assert n == exact  # = the reference's trainable parameters (it adds 16 fixed rotary freqs)


def _yaml_model(path, tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    with open(path) as f:
        return load_hyperpyyaml(f, {"output_folder": str(tmp_path)} if "recipes" in path else None)["model"]


@pytest.mark.parametrize("name, millions", [("mossformer2", 55.7), ("mossformer2-s", 37.8),
                                            ("mossformer2-tiny", 0.8)])
def test_recipe_yamls_build_the_configured_models(name, millions, tmp_path):
    """The recipe yamls (debug-run with fewer layers in test_recipes.py) at full depth; the
    inference yaml builds the same model as the recipe."""
    model = _yaml_model(os.path.join(ROOT, "recipes", "separation", "hparams", f"{name}.yaml"), tmp_path)
    assert isinstance(model, MossFormer2)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
    if name == "mossformer2":
        hub = _yaml_model(os.path.join(ROOT, "hparams", "mossformer2.yaml"), tmp_path)
        assert hub.config == model.config


# ---- equivalence with the reference ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(reference):
    ref = reference_model(reference, **CONFIGS["tiny"])
    ours = load_clearvoice_checkpoint({"model": ref.state_dict()}).eval()
    return ref, ours


@pytest.mark.parametrize("seconds, batch", [(0.5, 1), (1.3, 1), (4.1, 1), (0.77, 2)])
def test_tiny_matches_reference(tiny_pair, seconds, batch):
    """Frame counts 999, 2599, 8199, 1539: none a multiple of the 256-frame attention group
    (8199 frames also goes past the reference's 8192-position rotary cache)."""
    ref, ours = tiny_pair
    x = mix(seconds, batch)
    expected = run_reference(ref, x)
    with torch.no_grad():
        got = ours(x)
    assert got.shape == (batch, x.shape[1], 2)
    assert (got - expected).abs().max().item() <= 1e-4


def test_same_function_in_float64(reference):
    """In float64 the two implementations agree to rounding: the same maths, not just close."""
    # float64 convolutions have no fast CPU kernels: a narrower model keeps this quick
    ref = reference_model(reference, N=16, num_layers=2, dtype=torch.float64)
    ours = MossFormer2(N=16, num_layers=2).double().eval()
    load_clearvoice_checkpoint(ref.state_dict(), model=ours)  # float64 weights, no rounding
    x = mix(0.2).double()  # 399 frames: one full attention group and a partial one
    with torch.no_grad():
        assert (ours(x) - run_reference(ref, x)).abs().max().item() < 1e-10


def test_full_model_matches_reference(reference):
    ref = reference_model(reference, **CONFIGS["mossformer2"])
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    ours = load_clearvoice_checkpoint({"model": ref.state_dict()}).eval()
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    x = mix(1.0)  # 1999 frames: 7 full attention groups and a partial one
    with torch.no_grad():
        diff = (ours(x) - run_reference(ref, x)).abs().max().item()
    assert diff <= 1e-4


# ---- ClearerVoice checkpoints ---------------------------------------------------------------


def test_every_reference_key_has_one_name_of_ours(reference):
    ref_keys = list(reference_model(reference, N=32, num_layers=3).state_dict())
    ours = MossFormer2(N=32, num_layers=3).state_dict()
    mapped = {}
    for k in ref_keys:
        if k.endswith("rotary_pos_emb.freqs") or k.endswith("pos_enc.inv_freq"):
            continue  # fixed buffers, checked instead of loaded
        name = clearvoice_to_ours(k)
        assert name in ours, k
        assert ours_to_clearvoice(name) == k
        mapped[name] = k
    assert sorted(mapped) == sorted(ours)  # one to one, nothing of ours left out


@pytest.mark.parametrize("config", ["mossformer2", "tiny"])
def test_every_name_of_ours_round_trips_through_its_clearvoice_key(config):
    for name in MossFormer2(**CONFIGS[config]).state_dict():
        theirs = ours_to_clearvoice(name)
        assert theirs is not None and theirs != name, name
        assert clearvoice_to_ours(theirs) == name


@pytest.fixture(scope="module")
def tiny_checkpoint(reference, tmp_path_factory):
    """A ClearerVoice-style file of the tiny reference model, as its trainer saves it."""
    ref = reference_model(reference, **CONFIGS["tiny"], seed=3)
    path = tmp_path_factory.mktemp("clearvoice") / "last_best_model.pt"
    torch.save({"model": ref.state_dict(), "epoch": 12, "step": 3400}, path)
    return ref, path


def test_load_checkpoint_file_plain_prefixed_and_bare(tiny_checkpoint, tmp_path):
    ref, path = tiny_checkpoint
    state = torch.load(path, weights_only=True)["model"]
    prefixed = tmp_path / "ddp.pt"
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, prefixed)
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    x = mix(0.4)
    expected = run_reference(ref, x)
    assert clearvoice_config(state) == dict(N=64, L=16, num_layers=2, n_src=2, qk_dim=128,
                                            expansion_factor=4.0, fsmn_dim=256, fsmn_order=20,
                                            kernel_size=17)
    for source in (path, str(prefixed), bare):
        model = load_clearvoice_checkpoint(source).eval()
        with torch.no_grad():
            assert (model(x) - expected).abs().max().item() <= 1e-4
    into = MossFormer2(**CONFIGS["tiny"])
    assert load_clearvoice_checkpoint(path, model=into) is into


def _corrupt(path, tmp_path, change):
    state = dict(torch.load(path, weights_only=True)["model"])
    change(state)
    out = tmp_path / "bad.pt"
    torch.save({"model": state}, out)
    return out


PRELU = "mask_net.prelu.weight"
QK = "mask_net.mdl.intra_mdl.mossformerM.layers.1.to_qk.mdl.1.weight"


def test_missing_key_is_named(tiny_checkpoint, tmp_path):
    bad = _corrupt(tiny_checkpoint[1], tmp_path, lambda s: s.pop(PRELU))
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\):\s+mask_net\.prelu\.weight"):
        load_clearvoice_checkpoint(bad)
    with pytest.warns(UserWarning, match="mask_net.prelu.weight"):  # strict=False: loads the rest
        load_clearvoice_checkpoint(bad, strict=False)


def test_wrong_shape_is_named_even_when_not_strict(tiny_checkpoint, tmp_path):
    bad = _corrupt(tiny_checkpoint[1], tmp_path, lambda s: s.update({QK: s[QK][:100]}))
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match=re.escape(QK) + r": checkpoint \(100, 64\)"):
            load_clearvoice_checkpoint(bad, model=MossFormer2(**CONFIGS["tiny"]), strict=strict)


def test_fixed_buffers_are_checked_not_ignored(tiny_checkpoint, tmp_path):
    key = "mask_net.pos_enc.inv_freq"
    bad = _corrupt(tiny_checkpoint[1], tmp_path, lambda s: s.update({key: 2 * s[key]}))
    with pytest.raises(CheckpointMismatchError, match=r"wrong fixed buffer \(1\):\s+" + re.escape(key)):
        load_clearvoice_checkpoint(bad, strict=False)


def test_unexpected_key_and_wrong_config_are_named(tiny_checkpoint, tmp_path):
    bad = _corrupt(tiny_checkpoint[1], tmp_path, lambda s: s.update({"mask_net.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(1\):\s+mask_net\.extra\.weight"):
        load_clearvoice_checkpoint(bad)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(\d+\):[\s\S]*layers\.1\."):
        load_clearvoice_checkpoint(tiny_checkpoint[1], model=MossFormer2(N=64, num_layers=1))
    with pytest.raises(CheckpointMismatchError, match="not a ClearerVoice MossFormer2_SS checkpoint"):
        load_clearvoice_checkpoint({"weight": torch.ones(2)})


# ---- Separator folders and export -----------------------------------------------------------


def tiny_hparams():
    from modules.serving.export import set_yaml_values

    with open(os.path.join(ROOT, "hparams", "mossformer2.yaml")) as f:
        return set_yaml_values(f.read(), CONFIGS["tiny"])


def test_separator_loads_a_tiny_model_folder(tmp_path):
    from modules.serving.inference import Separator

    torch.manual_seed(0)
    model = MossFormer2(**CONFIGS["tiny"]).eval()
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "hyperparams.yaml").write_text(tiny_hparams())
    torch.save(model.state_dict(), folder / "model.ckpt")
    sep = Separator.from_hparams(source=str(folder), savedir=str(tmp_path / "saved"))
    assert sep.sample_rate == SR
    x = mix(0.7)
    with torch.no_grad():
        assert torch.equal(sep.separate_batch(x), model(x))


def test_export_from_clearvoice_gives_the_reference_output(tiny_checkpoint, tmp_path):
    from modules.serving.export import main as export_main
    from modules.serving.inference import Separator

    ref, path = tiny_checkpoint
    hub = tmp_path / "hub"
    assert export_main(["--from-clearvoice", str(path), str(hub)]) == 0
    assert sorted(os.listdir(hub)) == ["README.md", "hyperparams.yaml", "model.ckpt"]
    assert "Separator.from_hparams" in (hub / "README.md").read_text()
    sep = Separator.from_hparams(source=str(hub), savedir=str(tmp_path / "loaded"))
    x = mix(1.1, seed=5)
    assert (sep.separate_batch(x) - run_reference(ref, x)).abs().max().item() <= 1e-4


def test_export_from_clearvoice_refuses_a_bad_checkpoint(tiny_checkpoint, tmp_path):
    from modules.serving.export import export_clearvoice

    bad = _corrupt(tiny_checkpoint[1], tmp_path, lambda s: s.pop(PRELU))
    with pytest.raises(CheckpointMismatchError, match="mask_net.prelu.weight"):
        export_clearvoice(str(bad), str(tmp_path / "hub"))
    assert not (tmp_path / "hub").exists()


def test_training_step_gives_finite_gradients():
    torch.manual_seed(0)
    model = MossFormer2(N=16, num_layers=1, group_size=32, qk_dim=16, fsmn_dim=16).train()
    est = model(torch.randn(2, 4000))
    est.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---- the fast paths (bench/mossformer2.py) compute the same function -------------------------


@pytest.mark.parametrize("batch, frames, c_out, per_group, k, dilation", [
    (2, 37, 3, 1, 5, 1),   # depthwise, batch 2
    (1, 41, 3, 2, 7, 2),   # groups of 2 input channels, dilation 2, odd length
    (2, 30, 2, 2, 5, 2),
    (1, 70, 4, 1, 17, 1),  # kernel wider than a quarter of the input
])
def test_conv_along_frames_is_conv1d_forward_and_backward(batch, frames, c_out, per_group, k, dilation):
    """Channels-last depthwise convs with their own backward (input gradient by the flipped
    kernel, weight gradient as a convolution over chunks) against ``F.conv1d``, float64."""
    import torch.nn.functional as F

    from modules.models.mossformer2 import conv_along_frames

    gen = torch.Generator().manual_seed(frames)
    x = torch.randn(batch, frames, c_out * per_group, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(c_out, per_group, k, dtype=torch.float64, generator=gen, requires_grad=True)
    expected = F.conv1d(x.transpose(1, 2), w, padding=(k - 1) // 2 * dilation, dilation=dilation,
                        groups=c_out).transpose(1, 2)
    got = conv_along_frames(x, w, dilation)
    assert (got - expected).abs().max().item() < 1e-12
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad(expected, (x, w), grad)
    have = torch.autograd.grad(got, (x, w), grad)
    for a, b in zip(want, have):
        assert (a - b).abs().max().item() < 1e-12
    assert torch.autograd.gradcheck(lambda x, w: conv_along_frames(x, w, dilation), (x, w))


def test_fast_dropout_rate_scale_and_eval():
    from modules.models.mossformer2 import FastDropout

    drop = FastDropout(0.1).train()
    x = torch.ones(400, 1000)
    torch.manual_seed(0)
    y = drop(x)
    rate = (y == 0).float().mean().item()
    assert abs(rate - 0.1) < 0.003  # 400k draws: the standard error is 0.0005
    assert abs(y.mean().item() - 1.0) < 0.01  # kept elements scaled to keep the mean
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the seeded generator replays (activation checkpointing)
    assert not torch.equal(drop(x), y)
    assert drop.eval()(x) is x


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return MossFormer2(N=32, num_layers=2, group_size=64, qk_dim=32, fsmn_dim=32, **kw)


def test_activation_checkpointing_gives_the_same_gradients():
    """Dropout on: the recomputed layers must replay the same masks."""
    x, target = mix(0.3, batch=2, seed=1), torch.randn(2, 4800, 2)
    grads = []
    for checkpoint in (False, True):
        model = _tiny(checkpoint_layers=checkpoint).train()
        torch.manual_seed(5)
        (model(x) - target).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_inference_paths_agree_with_the_autograd_path():
    """Under no_grad the model gates and applies SiLU in place and, at batch 1, uses 2-D
    products; with gradients on it does neither. Same outputs, alone or batched."""
    model = _tiny().eval()
    x = mix(0.37, batch=2, seed=2)  # 739 frames: 11 full groups of 64 and a partial one
    with torch.no_grad():
        fast = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(2)])
    plain = model(x).detach()
    assert (fast - plain).abs().max().item() < 1e-5
    assert (single - plain).abs().max().item() < 1e-5


def test_bf16_separator_within_35_db_of_fp32(tmp_path):
    from modules.serving.inference import Separator

    folder = tmp_path / "tiny"
    folder.mkdir()
    model = MossFormer2(**CONFIGS["tiny"])
    torch.save(model.state_dict(), folder / "model.ckpt")
    (folder / "hyperparams.yaml").write_text(tiny_hparams() + "chunk_seconds: 1.0\noverlap_seconds: 0.25\n")
    sep = Separator.from_hparams(source=str(folder), savedir=str(tmp_path / "saved"))
    x = mix(2.3)  # three chunks
    fp32 = sep.separate_batch(x)
    sep.precision = "bf16"
    bf16 = sep.separate_batch(x)
    assert bf16.dtype == torch.float32
    snr = 10 * torch.log10(fp32.pow(2).sum() / (fp32 - bf16).pow(2).sum()).item()
    assert snr >= 35, snr
    sep.precision = "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        sep.separate_batch(x)


def test_export_carries_the_runs_size_overrides(tmp_path):
    """A run trained with ``--N=32 --num_layers=1 --sample_rate=8000`` on the command line
    exports to a folder whose yaml has those values (the recipe's defaults are 512, 24, 16000):
    export writes the run's resolved model section, and the folder loads with the run's weights."""
    from modules.serving.export import export
    from modules.serving.inference import Separator

    run = tmp_path / "run"
    ckpt = run / "save" / "CKPT+2026-01-01+00-00-00+00"
    ckpt.mkdir(parents=True)
    with open(os.path.join(ROOT, "recipes", "separation", "hparams", "mossformer2.yaml")) as f:
        saved = resolve_references(f, {"N": 32, "num_layers": 1, "sample_rate": 8000}).getvalue()
    (run / "hyperparams.yaml").write_text(saved)  # what SpeechBrain saves for the run
    (ckpt / "CKPT.yaml").write_text("si-snr: 1.5\nunixtime: 1.0\nend-of-epoch: true\n")
    torch.manual_seed(0)
    model = MossFormer2(N=32, num_layers=1).eval()
    torch.save(model.state_dict(), ckpt / "model.ckpt")
    hub = export(str(run), str(tmp_path / "hub"))
    text = open(os.path.join(hub, "hyperparams.yaml")).read()
    assert re.search(r"^ +N: 32$", text, re.M) and re.search(r"^ +num_layers: 1$", text, re.M)
    assert re.search(r"^sample_rate: 8000$", text, re.M) and re.search(r"^ +qk_dim: 128$", text, re.M)
    sep = Separator.from_hparams(source=hub, savedir=str(tmp_path / "loaded"))
    assert sep.sample_rate == 8000
    x = mix(0.4)
    with torch.no_grad():
        assert torch.equal(sep.separate_batch(x), model(x))
