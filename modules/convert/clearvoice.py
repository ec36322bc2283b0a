"""ClearerVoice MossFormer2 checkpoints: key renames in both directions, reading, loading.

Weights of the released ClearerVoice model ``MossFormer2_SS_16K`` (PyPI package ``clearvoice``
0.1.2, ``clearvoice/models/mossformer2_ss/``) load into :class:`~modules.models.mossformer2.MossFormer2`
with :func:`load_clearvoice_checkpoint`; the model then gives the same output as that code
(tests/test_mossformer2.py checks it).

Key names are those of ``MossFormer2_SS_16K(args).model`` in clearvoice 0.1.2,
clearvoice/models/mossformer2_ss/mossformer2.py (MossFormer, MossFormer_MaskNet,
Computation_Block, MossFormerM) and mossformer2_block.py (MossformerBlock_GFSMN,
FLASH_ShareA_FFConvM, FFConvM, Gated_FSMN_Block_Dilated, Gated_FSMN_dilated), fsmn.py
(UniDeepFsmn_dilated, DilatedDenseNet), conv_module.py (ConvModule). The checkpoint file is
``{'model': state_dict, ...}`` (clearvoice/networks.py SpeechModel._load_model, model_key='model'),
sometimes with a ``module.`` prefix (DataParallel). Its 1x1 Conv1d weights ``[out, in, 1]`` load
into our nn.Linear ``[out, in]``, its Conv2d (k, 1) FSMN kernels ``[C, g, k, 1]`` into Conv1d
``[C, g, k]``.

Each rename is written once, as a pair of templates (ClearerVoice, ours) that both
:func:`clearvoice_to_ours` and :func:`ours_to_clearvoice` use. A template is literal text with
fields: ``{i}`` stands for the same number on both sides, ``{i+1}`` for that number plus one,
``{proj}`` for one of the attention block's projections.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
import torch.nn as nn

from modules.models.mossformer2 import MossFormer2

__all__ = [
    "CheckpointMismatchError",
    "clearvoice_config",
    "clearvoice_to_ours",
    "ours_to_clearvoice",
    "read_clearvoice_state_dict",
    "convert_clearvoice_state_dict",
    "load_clearvoice_checkpoint",
]

_LAYER = "mask_net.mdl.intra_mdl.mossformerM"

# (ClearerVoice, ours) at the start of a key; the first match wins
_PREFIXES = [
    ("enc.conv1d.", "encoder.conv."),
    ("dec.", "decoder.deconv."),
    ("mask_net.norm.", "masker.norm."),
    ("mask_net.conv1d_encoder.", "masker.in_proj."),
    ("mask_net.pos_enc.", "masker.pos_enc."),
    (_LAYER + ".layers.{i}.", "masker.layers.{i}.attention."),
    (_LAYER + ".fsmn.{i}.", "masker.layers.{i}.fsmn."),
    ("mask_net.mdl.intra_mdl.norm.", "masker.out_norm."),
    ("mask_net.mdl.intra_norm.", "masker.skip_norm."),
    ("mask_net.prelu.", "masker.prelu."),
    ("mask_net.conv1d_out.", "masker.mask_proj."),
    ("mask_net.output.0.", "masker.tanh_proj."),
    ("mask_net.output_gate.0.", "masker.gate_proj."),
    ("mask_net.conv1_decoder.", "masker.out_proj."),
]
# (ClearerVoice, ours) inside a block, after the prefix; tried at each dotted part, left to right
_INNER = [
    ("{proj}.mdl.0.", "{proj}.norm."),
    ("{proj}.mdl.1.", "{proj}.linear."),
    ("{proj}.mdl.3.sequential.1.conv.", "{proj}.dwconv."),
    ("conv1.0.", "in_proj."),
    ("conv1.1.", "in_act."),
    ("conv2.", "out_proj."),
    ("gated_fsmn.", "gated."),
    ("fsmn.conv.conv{i+1}.", "fsmn.convs.{i}."),
    ("fsmn.conv.norm{i+1}.", "fsmn.norms.{i}."),
    ("fsmn.conv.prelu{i+1}.", "fsmn.acts.{i}."),
]
# what each template field matches
_FIELD_VALUES = {"i": r"\d+", "proj": "to_hidden|to_qk|to_out|to_u|to_v"}
_FIELD = re.compile(r"\{(\w+)(?:\+(\d+))?\}")

# buffers of fixed values: checked against ours, never loaded
_CONSTANT_KEYS = re.compile(re.escape(_LAYER) + r"\.layers\.(\d+)\.rotary_pos_emb\.freqs$|mask_net\.pos_enc\.inv_freq$")


class _Rename:
    """One template pair, one direction: matches ``source`` at the start of a string and gives
    ``target`` with the fields filled in."""

    def __init__(self, source: str, target: str):
        pattern, self.fields, end = [], [], 0
        for field in _FIELD.finditer(source):
            pattern += [re.escape(source[end:field.start()]), f"({_FIELD_VALUES[field.group(1)]})"]
            self.fields.append((field.group(1), int(field.group(2) or 0)))
            end = field.end()
        self.pattern = re.compile("".join(pattern) + re.escape(source[end:]))
        if {m.group(1) for m in _FIELD.finditer(target)} != {name for name, _ in self.fields}:
            raise ValueError(f"the templates {source!r} and {target!r} do not have the same fields")
        self.target = target

    def match(self, text: str) -> tuple[str, int] | None:
        """``(renamed start of text, length of the start that matched)``, or None."""
        m = self.pattern.match(text)
        if not m:
            return None
        found = {name: (value, offset) for (name, offset), value in zip(self.fields, m.groups())}

        def fill(field):
            value, offset = found[field.group(1)]
            wanted = int(field.group(2) or 0)
            return value if wanted == offset else str(int(value) - offset + wanted)

        return _FIELD.sub(fill, self.target), m.end()


def _renames(table, to_ours: bool) -> list[_Rename]:
    return [_Rename(theirs, ours) if to_ours else _Rename(ours, theirs) for theirs, ours in table]


_TO_OURS = (_renames(_PREFIXES, True), _renames(_INNER, True))
_TO_CLEARVOICE = (_renames(_PREFIXES, False), _renames(_INNER, False))


def _rename(key: str, prefixes: list[_Rename], inner: list[_Rename]) -> str | None:
    for rename in prefixes:
        found = rename.match(key)
        if found:
            head, tail = found[0], key[found[1]:]
            break
    else:
        return None
    tail_out = ""
    while tail:  # the inner renames rewrite the dotted path left to right
        for rename in inner:
            found = rename.match(tail)
            if found:
                tail_out += found[0]
                tail = tail[found[1]:]
                break
        else:
            part, _, tail = tail.partition(".")
            tail_out += part + ("." if tail else "")
    return head + tail_out


def clearvoice_to_ours(key: str) -> str | None:
    """Our parameter name for a ClearerVoice ``MossFormer2_SS_16K`` key (None if unknown)."""
    return _rename(key, *_TO_OURS)


def ours_to_clearvoice(key: str) -> str | None:
    """The ClearerVoice key of one of our parameter names (None if it has none)."""
    return _rename(key, *_TO_CLEARVOICE)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model: the message names every offending key."""


def read_clearvoice_state_dict(path_or_state_dict) -> dict[str, torch.Tensor]:
    """The ClearerVoice state dict of a checkpoint file or dict, without ``module.`` prefixes.

    Accepts ``{'model': state_dict, ...}`` (what ClearerVoice saves) or a bare state dict.
    Files are read with ``torch.load(..., weights_only=True)``.
    """
    source = path_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - say which file and why
            raise CheckpointMismatchError(
                f"cannot read {os.fspath(path_or_state_dict)} as a PyTorch checkpoint with "
                f"weights_only=True: {err}") from err
    if not isinstance(source, dict):
        raise CheckpointMismatchError(f"expected a state dict or {{'model': state_dict}}, got "
                                      f"{type(source).__name__}")
    if "model" in source and isinstance(source["model"], dict):
        source = source["model"]
    not_tensors = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointMismatchError(
            "expected a state dict (name -> tensor) or {'model': state_dict, ...}; these "
            f"entries are not tensors: {not_tensors[:10]}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in source.items()}


def clearvoice_config(state: dict[str, torch.Tensor]) -> dict:
    """:class:`MossFormer2` arguments read off a ClearerVoice state dict's shapes
    (``group_size`` has no weights; ClearerVoice always uses 256, our default)."""
    try:
        N, _, L = state["enc.conv1d.weight"].shape
        layers = {int(m.group(1)) for k in state
                  for m in [re.match(re.escape(_LAYER) + r"\.layers\.(\d+)\.", k)] if m}
        hidden = state[f"{_LAYER}.layers.0.to_hidden.mdl.1.weight"].shape[0]
        cfg = dict(
            N=int(N), L=int(L), num_layers=max(layers) + 1,
            n_src=int(state["mask_net.conv1d_out.weight"].shape[0] // N),
            qk_dim=int(state[f"{_LAYER}.layers.0.to_qk.mdl.1.weight"].shape[0]),
            expansion_factor=hidden / N,
            fsmn_dim=int(state[f"{_LAYER}.fsmn.0.conv1.0.weight"].shape[0]),
            fsmn_order=(int(state[f"{_LAYER}.fsmn.0.gated_fsmn.fsmn.conv.conv1.weight"].shape[2]) + 1) // 2,
            kernel_size=int(state[f"{_LAYER}.layers.0.to_hidden.mdl.3.sequential.1.conv.weight"].shape[-1]),
        )
    except (KeyError, ValueError) as err:
        shown = sorted(state)[:5]
        raise CheckpointMismatchError(
            f"not a ClearerVoice MossFormer2_SS checkpoint: {err} not found (keys start with "
            f"{shown}); expected keys such as enc.conv1d.weight, mask_net.*, dec.weight") from err
    if cfg["expansion_factor"] == int(cfg["expansion_factor"]):
        cfg["expansion_factor"] = float(int(cfg["expansion_factor"]))
    return cfg


def convert_clearvoice_state_dict(state: dict[str, torch.Tensor], model: nn.Module,
                                  strict: bool = True) -> dict[str, torch.Tensor]:
    """Map a ClearerVoice state dict (no ``module.`` prefix) onto ``model``'s names and shapes.

    Every key is accounted for: unknown or surplus keys ("unexpected"), weights the model
    needs that the checkpoint lacks ("missing") and weights of another shape are listed by
    name in a :class:`CheckpointMismatchError`. ``strict=False`` loads what fits and warns
    about missing and unexpected keys by name; a wrong shape or a wrong constant is always an
    error. Fixed buffers of the reference (rotary and sinusoidal frequencies) are compared with
    ours instead of loaded.
    """
    target = model.state_dict()
    constants = {"masker.pos_enc.inv_freq": model.masker.pos_enc.inv_freq,
                 "rotary": model.masker.rotary.freqs}
    out, unexpected, wrong_shape, wrong_constant = {}, [], [], []
    for key, value in state.items():
        if _CONSTANT_KEYS.match(key):
            ours = constants["rotary"] if "rotary" in key else constants["masker.pos_enc.inv_freq"]
            if value.shape != ours.shape or not torch.allclose(value.double().cpu(), ours.double().cpu()):
                wrong_constant.append(f"{key}: checkpoint {tuple(value.shape)} differs from the "
                                      f"fixed frequencies {tuple(ours.shape)} of this model")
            continue
        name = clearvoice_to_ours(key)
        if name is None or name not in target:
            unexpected.append(key + (f" (-> {name})" if name else ""))
            continue
        want = target[name].shape
        if value.shape != want:
            extra = value.shape[len(want):]
            if value.shape[:len(want)] == want and all(s == 1 for s in extra):
                value = value.reshape(want)  # a 1x1 conv into a linear layer, (k, 1) conv into (k)
            else:
                wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)}, model {name} "
                                   f"expects {tuple(want)}")
                continue
        out[name] = value
    missing = [f"{ours_to_clearvoice(k) or '?'} (model {k})" for k in target if k not in out]
    problems = []
    if wrong_shape:
        problems.append(f"wrong shape ({len(wrong_shape)}):\n    " + "\n    ".join(wrong_shape))
    if wrong_constant:
        problems.append(f"wrong fixed buffer ({len(wrong_constant)}):\n    " + "\n    ".join(wrong_constant))
    soft = []
    if missing:
        soft.append(f"missing ({len(missing)}):\n    " + "\n    ".join(missing))
    if unexpected:
        soft.append(f"unexpected ({len(unexpected)}):\n    " + "\n    ".join(unexpected))
    cfg = getattr(model, "config", {})
    what = f"{type(model).__name__}({', '.join(f'{k}={v}' for k, v in cfg.items())})"
    if problems or (strict and soft):
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {what}:\n  " + "\n  ".join(problems + (soft if strict else []))
            + "\nIs it a ClearerVoice MossFormer2_SS checkpoint of this configuration? "
            "load_clearvoice_checkpoint(path) without a model builds the matching one.")
    if soft:
        warnings.warn(f"loading a partial checkpoint into {what}:\n  " + "\n  ".join(soft), stacklevel=3)
    return out


def load_clearvoice_checkpoint(path_or_state_dict, model: MossFormer2 | None = None,
                               strict: bool = True) -> MossFormer2:
    """Load ClearerVoice ``MossFormer2_SS_16K`` weights into ``model`` (or into a new
    :class:`MossFormer2` whose configuration is read off the checkpoint) and return it.

    ``path_or_state_dict``: a file saved as ``{'model': state_dict, ...}`` or as a bare state
    dict, or such a dict; a ``module.`` prefix is stripped. Any key that does not fit raises a
    :class:`CheckpointMismatchError` naming it (see :func:`convert_clearvoice_state_dict`).
    """
    state = read_clearvoice_state_dict(path_or_state_dict)
    if model is None:
        model = MossFormer2(**clearvoice_config(state))
    converted = convert_clearvoice_state_dict(state, model, strict=strict)
    model.load_state_dict(converted, strict=strict)
    return model
