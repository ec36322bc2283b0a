"""Original unilm / fairseq WavLM checkpoints (WavLM-Base.pt, WavLM-Base+.pt, WavLM-Large.pt).

:func:`load_fairseq_wavlm` reads such a file (``{'cfg': ..., 'model': state_dict}``) with
``torch.load(weights_only=True)`` and converts it to a transformers ``WavLMConfig`` and a
``WavLMModel`` state dict; :func:`wavlm_lobe` builds a :class:`~modules.models.wavlm.WavLM` lobe
from either such a file or a Hugging Face folder.

Facts come from unilm's ``wavlm/WavLM.py`` and ``wavlm/modules.py``
(https://github.com/microsoft/unilm) and transformers'
``src/transformers/models/wavlm/convert_wavlm_original_pytorch_checkpoint_to_pytorch.py``
(https://github.com/huggingface/transformers), cited where used.
"""

from __future__ import annotations

import ast
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence

import torch
from transformers import WavLMConfig, WavLMModel

from modules.models.wavlm import WavLM

__all__ = [
    "convert_fairseq_wavlm",
    "load_fairseq_wavlm",
    "fairseq_cfg_to_hf_config",
    "parse_conv_feature_layers",
    "wavlm_lobe",
]

# Defaults of unilm's WavLMConfig (wavlm/WavLM.py, https://github.com/microsoft/unilm); the
# released checkpoints' `cfg` overrides them, missing keys keep these values as in unilm.
_UNILM_DEFAULTS = dict(
    extractor_mode="default",
    encoder_layers=12,
    encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12,
    activation_fn="gelu",
    layer_norm_first=False,
    conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    conv_bias=False,
    normalize=False,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    dropout_input=0.0,
    mask_length=10,
    mask_prob=0.65,
    mask_channel_length=10,
    mask_channel_prob=0.0,
    conv_pos=128,
    conv_pos_groups=16,
    relative_position_embedding=False,
    num_buckets=320,
    max_distance=1280,
    gru_rel_pos=False,
)


def parse_conv_feature_layers(spec: str) -> list[tuple[int, int, int]]:
    """Parse fairseq's ``conv_feature_layers`` string, e.g.
    ``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``, into ``[(dim, kernel, stride), ...]``.

    unilm evaluates this string with ``eval``; here only integer literals, tuples, lists, ``+``
    and ``*`` are accepted, so a checkpoint cannot run code through it."""

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(item) for item in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)} in conv_feature_layers {spec!r}")

    try:
        layers = value(ast.parse(spec, mode="eval"))
    except SyntaxError as error:
        raise ValueError(f"conv_feature_layers {spec!r} is not a list expression: {error}") from None
    if not isinstance(layers, list) or not all(
        isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(x, int) for x in layer)
        for layer in layers
    ):
        raise ValueError(f"conv_feature_layers {spec!r} must give a list of (dim, kernel, stride) tuples")
    return layers


def _plain_cfg(cfg) -> dict:
    """The model part of a checkpoint's cfg as a plain dict (dict, Mapping, object with
    attributes, or a fairseq/hydra cfg whose model settings sit under 'model')."""
    if not isinstance(cfg, Mapping):
        cfg = vars(cfg)
    cfg = dict(cfg)
    model = cfg.get("model")
    if "encoder_layers" not in cfg and model is not None:
        cfg = dict(model) if isinstance(model, Mapping) else dict(vars(model))
    return cfg


# transformers WavLMConfig field <- unilm / fairseq cfg key, values taken as they are
_SAME_VALUE_KEYS = {
    "hidden_dropout": "dropout", "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout", "feat_proj_dropout": "dropout_input",
    "layerdrop": "encoder_layerdrop", "num_conv_pos_embeddings": "conv_pos",
    "num_conv_pos_embedding_groups": "conv_pos_groups", "num_buckets": "num_buckets",
    "max_bucket_distance": "max_distance", "mask_time_prob": "mask_prob",
    "mask_time_length": "mask_length", "mask_feature_prob": "mask_channel_prob",
    "mask_feature_length": "mask_channel_length",
}


def fairseq_cfg_to_hf_config(cfg) -> WavLMConfig:
    """transformers ``WavLMConfig`` for a unilm WavLM ``cfg`` (field meanings from unilm's
    ``WavLMConfig`` in wavlm/WavLM.py and transformers' ``configuration_wavlm.py``).

    The release's ``normalize`` (normalise the waveform first) is kept as ``do_normalize``, the
    name transformers' ``Wav2Vec2FeatureExtractor`` uses for it."""
    cfg = {**_UNILM_DEFAULTS, **_plain_cfg(cfg)}
    if not (cfg["relative_position_embedding"] and cfg["gru_rel_pos"]):
        raise ValueError(
            "this checkpoint has no gated relative position bias (relative_position_embedding="
            f"{cfg['relative_position_embedding']}, gru_rel_pos={cfg['gru_rel_pos']}): it is not a WavLM "
            "model that transformers' WavLMModel can hold"
        )
    modes = {"default": "group", "layer_norm": "layer"}
    if cfg["extractor_mode"] not in modes:
        raise ValueError(f"unknown extractor_mode {cfg['extractor_mode']!r}; expected one of {sorted(modes)}")
    conv = parse_conv_feature_layers(cfg["conv_feature_layers"])
    config = WavLMConfig(
        hidden_size=cfg["encoder_embed_dim"],
        num_hidden_layers=cfg["encoder_layers"],
        num_attention_heads=cfg["encoder_attention_heads"],
        intermediate_size=cfg["encoder_ffn_embed_dim"],
        hidden_act=cfg["activation_fn"],
        feat_extract_activation="gelu",
        do_stable_layer_norm=bool(cfg["layer_norm_first"]),
        feat_extract_norm=modes[cfg["extractor_mode"]],
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=bool(cfg["conv_bias"]),
        **{ours: cfg[theirs] for ours, theirs in _SAME_VALUE_KEYS.items()},
    )
    config.do_normalize = bool(cfg["normalize"])
    return config


# unilm key (after "encoder.layers.N.") -> transformers key (after "encoder.layers.N.").
# Source: MAPPING of transformers' convert_wavlm_original_pytorch_checkpoint_to_pytorch.py
# (src/transformers/models/wavlm/, https://github.com/huggingface/transformers) and the module
# names of unilm's wavlm/WavLM.py + wavlm/modules.py.
_LAYER_KEYS = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.out_proj",
    "self_attn.grep_linear": "attention.gru_rel_pos_linear",
    "self_attn.grep_a": "attention.gru_rel_pos_const",
    "self_attn.relative_attention_bias": "attention.rel_attn_embed",
    "self_attn_layer_norm": "layer_norm",
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
}
# whole-key prefixes outside the layers
_TOP_KEYS = {
    "post_extract_proj.": "feature_projection.projection.",
    "layer_norm.": "feature_projection.layer_norm.",
    "encoder.layer_norm.": "encoder.layer_norm.",
    "encoder.pos_conv.0.bias": "encoder.pos_conv_embed.conv.bias",
    # weight norm (dim=2): old-style weight_g / weight_v, or torch parametrizations
    "encoder.pos_conv.0.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    "encoder.pos_conv.0.parametrizations.weight.": "encoder.pos_conv_embed.conv.parametrizations.weight.",
    "mask_emb": "masked_spec_embed",
}


def _map_fairseq_key(name: str) -> str | None:
    """transformers key for one unilm key, or None if it has no counterpart."""
    parts = name.split(".")
    if name.startswith("feature_extractor.conv_layers.") and len(parts) >= 5:
        # Sequential(conv, dropout, norm, GELU): index 0 = conv; index 2 = GroupNorm (first
        # layer, "default" mode) or Sequential(TransposeLast, LayerNorm, TransposeLast) whose
        # LayerNorm is item 1 ("layer_norm" mode)
        layer, item, leaf = parts[2], parts[3], parts[-1]
        if item == "0" and len(parts) == 5:
            return f"feature_extractor.conv_layers.{layer}.conv.{leaf}"
        if item == "2" and (len(parts) == 5 or (len(parts) == 6 and parts[4] == "1")):
            return f"feature_extractor.conv_layers.{layer}.layer_norm.{leaf}"
        return None
    if name.startswith("encoder.layers.") and len(parts) >= 4:
        rest = ".".join(parts[3:])
        for old, new in _LAYER_KEYS.items():
            if rest == old or rest.startswith(old + "."):
                return f"encoder.layers.{parts[2]}.{new}{rest[len(old):]}"
        return None
    for old, new in _TOP_KEYS.items():
        if name == old or (old.endswith(".") and name.startswith(old)):
            return new + name[len(old):] if old.endswith(".") else new
    return None


def convert_fairseq_wavlm(state_dict: Mapping[str, torch.Tensor], cfg, strict: bool = True):
    """Convert an original unilm WavLM checkpoint to transformers' ``WavLMModel`` format.

    Arguments
    ---------
    state_dict : mapping
        ``checkpoint['model']`` of ``WavLM-Base.pt`` / ``WavLM-Base+.pt`` / ``WavLM-Large.pt``.
    cfg : dict
        ``checkpoint['cfg']`` (fields of unilm's ``WavLMConfig``; missing ones take its defaults).
    strict : bool
        Raise (default) if a key has no counterpart, a ``WavLMModel`` weight is not provided, or a
        shape differs; with False the problems are only listed in a warning.

    Returns
    -------
    (transformers.WavLMConfig, dict)
        The config (with ``do_normalize`` = the release's ``normalize``) and a state dict that
        ``WavLMModel(config).load_state_dict(..., strict=True)`` accepts.

    Key names follow transformers' ``convert_wavlm_original_pytorch_checkpoint_to_pytorch.py``:
    ``feature_extractor.conv_layers.N.0`` -> ``...conv_layers.N.conv``, ``...N.2`` ->
    ``...N.layer_norm``, ``post_extract_proj`` -> ``feature_projection.projection``,
    ``layer_norm`` -> ``feature_projection.layer_norm``, ``encoder.pos_conv.0.weight_g/v`` ->
    ``encoder.pos_conv_embed.conv`` weight norm, ``self_attn.*`` -> ``attention.*``
    (``grep_linear`` -> ``gru_rel_pos_linear``, ``grep_a`` -> ``gru_rel_pos_const``,
    ``relative_attention_bias`` -> ``rel_attn_embed``), ``self_attn_layer_norm`` ->
    ``layer_norm``, ``fc1/fc2`` -> ``feed_forward.intermediate_dense/output_dense``,
    ``mask_emb`` -> ``masked_spec_embed``. unilm has no ``post_extract_proj`` when the conv
    output already has the model width; an identity projection is then inserted.
    """
    config = fairseq_cfg_to_hf_config(cfg)
    with torch.device("meta"):
        reference = WavLMModel(config).state_dict()
    converted, unexpected, mismatched = {}, [], []
    for name, tensor in state_dict.items():
        new = _map_fairseq_key(name)
        if new is None or new not in reference:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(reference[new].shape):
            mismatched.append(f"{name} {tuple(tensor.shape)} -> {new} {tuple(reference[new].shape)}")
            continue
        converted[new] = tensor
    width = config.conv_dim[-1]
    if "feature_projection.projection.weight" not in converted and width == config.hidden_size:
        some = next(iter(state_dict.values()))
        converted["feature_projection.projection.weight"] = torch.eye(width, dtype=some.dtype)
        converted["feature_projection.projection.bias"] = torch.zeros(width, dtype=some.dtype)
    # SpecAugment vector: unused for feature extraction, tolerated when absent
    missing = [key for key in reference if key not in converted and key != "masked_spec_embed"]
    if "masked_spec_embed" in reference and "masked_spec_embed" not in converted:
        converted["masked_spec_embed"] = torch.zeros(reference["masked_spec_embed"].shape)
    problems = []
    if unexpected:
        problems.append(f"checkpoint keys without a WavLMModel counterpart: {unexpected}")
    if missing:
        problems.append(f"WavLMModel weights not found in the checkpoint: {missing}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        message = "cannot convert the WavLM checkpoint; " + "; ".join(problems)
        if strict:
            raise ValueError(message + " (is cfg the checkpoint's own cfg?)")
        warnings.warn(message, stacklevel=2)
    return config, converted


def load_fairseq_wavlm(path: str, safe_globals: Sequence[type] = (), strict: bool = True):
    """Read an original unilm WavLM checkpoint (``{'cfg': ..., 'model': state_dict}``, e.g.
    ``WavLM-Base+.pt``) and convert it with :func:`convert_fairseq_wavlm`.

    The file is read with ``torch.load(path, weights_only=True)``: tensors, dicts, lists and
    plain values only; no object of the checkpoint is constructed and none of its code runs.
    If the ``cfg`` was pickled as a Python object (an ``argparse.Namespace``, omegaconf
    ``DictConfig`` or unilm ``WavLMConfig`` instance), that load fails with
    :class:`pickle.UnpicklingError` naming the class, and this function re-raises it with the two
    ways out: allow exactly that class with ``safe_globals=[TheClass]`` if you trust the file (it
    is then built, but no arbitrary code runs), or re-save the checkpoint once as plain data in
    an environment you trust::

        ckpt = torch.load("WavLM-Base+.pt", weights_only=False)  # trusted file only
        cfg = ckpt["cfg"] if isinstance(ckpt["cfg"], dict) else vars(ckpt["cfg"])
        torch.save({"cfg": dict(cfg), "model": ckpt["model"]}, "WavLM-Base+.plain.pt")

    Returns
    -------
    (transformers.WavLMConfig, dict)
        As :func:`convert_fairseq_wavlm`.
    """
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        raise pickle.UnpicklingError(
            f"{path} contains Python objects that torch.load(weights_only=True) refuses to build "
            f"({detail}). This loader never unpickles arbitrary objects. If you trust the file, either "
            "pass safe_globals=[<that class>] to load_fairseq_wavlm, or re-save it once as plain data: "
            "ckpt = torch.load(path, weights_only=False); cfg = ckpt['cfg'] if isinstance(ckpt['cfg'], "
            "dict) else vars(ckpt['cfg']); torch.save({'cfg': dict(cfg), 'model': ckpt['model']}, new_path)"
        ) from None
    if not isinstance(checkpoint, Mapping) or "cfg" not in checkpoint or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a unilm WavLM checkpoint: expected a dict with 'cfg' and 'model', found {found}"
        )
    return convert_fairseq_wavlm(checkpoint["model"], checkpoint["cfg"], strict=strict)


def wavlm_lobe(source: str, **lobe_kwargs) -> WavLM:
    """A :class:`~modules.models.wavlm.WavLM` lobe from ``source``: a local HF-format folder
    (``WavLM(source=folder)``) or an original unilm checkpoint file such as ``WavLM-Base+.pt``
    (converted with :func:`load_fairseq_wavlm`, then loaded with ``strict=True``).

    ``lobe_kwargs`` are those of :class:`~modules.models.wavlm.WavLM` (``freeze``,
    ``normalize_wav``, ``config_overrides``, ...). For a checkpoint file, ``normalize_wav=None``
    (the default) follows its ``cfg['normalize']``.
    """
    if not os.path.isfile(source):
        return WavLM(source=source, **lobe_kwargs)
    config, state_dict = load_fairseq_wavlm(source)
    if lobe_kwargs.get("normalize_wav") is None:
        lobe_kwargs["normalize_wav"] = bool(getattr(config, "do_normalize", False))
    lobe = WavLM(config=config, **lobe_kwargs)
    lobe.model.load_state_dict(state_dict, strict=True)
    return lobe
