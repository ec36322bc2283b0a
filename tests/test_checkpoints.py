"""A save interrupted half-way (as by SIGKILL) must not break the next run's recovery."""

import os

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from modules.training.brain import SafeCheckpointer


class Interrupted(Exception):
    pass


def save_interrupted_after_the_model(checkpointer, model, value):
    """Save with the model's file written and the optimizer's never finished."""
    def dying_save(obj, path):
        open(path, "wb").write(b"\x80\x02half")  # a truncated file, then the process dies
        raise Interrupted

    checkpointer.custom_save_hooks["optimizer"] = dying_save
    with torch.no_grad():
        model.weight.fill_(value)
    with pytest.raises(Interrupted):
        checkpointer.save_checkpoint(meta={"step": value})
    del checkpointer.custom_save_hooks["optimizer"]


def make(cls, folder):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return cls(folder, recoverables={"model": model, "optimizer": opt}), model


@pytest.mark.parametrize("cls", [SafeCheckpointer, Checkpointer])
def test_interrupted_save_is_skipped_on_recovery(tmp_path, cls):
    ckpt, model = make(cls, tmp_path / "save")
    with torch.no_grad():
        model.weight.fill_(1.0)
    ckpt.save_checkpoint(meta={"step": 1})
    save_interrupted_after_the_model(ckpt, model, 2.0)

    fresh, fresh_model = make(cls, tmp_path / "save")
    if cls is Checkpointer:  # what SpeechBrain alone does with the half-written folder
        with pytest.raises(Exception):
            fresh.recover_if_possible()
        return
    loaded = fresh.recover_if_possible()
    assert loaded.meta["step"] == 1
    assert torch.all(fresh_model.weight == 1.0)
    assert len([d for d in os.listdir(tmp_path / "save") if d.startswith("CKPT")]) == 1


def test_complete_checkpoints_carry_no_marker(tmp_path):
    ckpt, _ = make(SafeCheckpointer, tmp_path / "save")
    saved = ckpt.save_and_keep_only(meta={"step": 1})
    assert saved is None or not os.path.exists(os.path.join(saved.path, SafeCheckpointer.MARKER))
    (path,) = [p for p in (tmp_path / "save").iterdir()]
    assert sorted(os.listdir(path)) == ["CKPT.yaml", "model.ckpt", "optimizer.ckpt"]



def test_load_weights_reads_safetensors_whatever_their_first_byte(tmp_path):
    """A safetensors file opens with its header's length, whose first byte can be torch's pickle
    byte 0x80; both formats must load, whatever that length is."""
    from safetensors.torch import save_file

    from modules.training.brain import is_safetensors, load_weights

    first_bytes = set()
    for extra in range(0, 160, 3):  # longer names move the header length through its low byte
        state = {"w" + "x" * extra: torch.randn(2, 2), "b" + "x" * extra: torch.randn(2)}
        path = tmp_path / f"w{extra}.safetensors"
        save_file(state, str(path))
        first_bytes.add(path.read_bytes()[0])
        assert is_safetensors(path)
        target = torch.nn.Module()
        for k, v in state.items():
            target.register_buffer(k, torch.zeros_like(v))
        load_weights(target, path)
        assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())
    assert 0x80 in first_bytes  # the case that was read as a pickle
    torch.save(state, tmp_path / "w.ckpt")
    assert not is_safetensors(tmp_path / "w.ckpt")
    load_weights(target, tmp_path / "w.ckpt")
