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
