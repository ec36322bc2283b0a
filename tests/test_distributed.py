"""Two-process DDP training on CPU (torchrun, gloo): shards, one writer, identical replicas."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from test_recipes import RECIPE, SMALL_DATA, TINY_MODEL

# Runs recipes/separation/train.py under torchrun, recording which training mixtures each
# process sees, which files each process writes with torch.save, and each replica's weights.
WRAPPER = """
import json, os, sys
sys.path[:0] = [{root!r}, {recipe!r}]
import torch
import train

rank, out = os.environ["RANK"], {out!r}
seen = open(os.path.join(out, f"ids_rank{{rank}}.txt"), "a")
fit_batch = train.SeparationBrain.fit_batch

def recording_fit_batch(self, batch):
    seen.write("".join(f"{{self.hparams.epoch_counter.current}} {{i}}\\n" for i in batch.id))
    seen.flush()
    return fit_batch(self, batch)

train.SeparationBrain.fit_batch = recording_fit_batch
save = torch.save
writes = []

def recording_save(obj, path, *a, **k):
    writes.append(str(path))
    return save(obj, path, *a, **k)

torch.save = recording_save
on_stage_start = train.SeparationBrain.on_stage_start

def record_weights(self, stage, epoch=None):
    if stage == train.sb.Stage.TEST:
        total = sum(float(p.double().sum()) for p in self.modules.parameters())
        json.dump({{"weights": total, "writes": writes}},
                  open(os.path.join(out, f"rank{{rank}}.json"), "w"))
    return on_stage_start(self, stage, epoch)

train.SeparationBrain.on_stage_start = record_weights
train.run(sys.argv[1:])
"""


def free_port() -> int:
    """A TCP port nobody listens on now (a fixed one can be taken by another run)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_on_cpu(tmp_path, cache):
    out = tmp_path / "ddp"
    out.mkdir()
    wrapper = tmp_path / "ddp_train.py"
    wrapper.write_text(WRAPPER.format(root=ROOT, recipe=RECIPE, out=str(out)))
    yaml = os.path.join(RECIPE, "hparams", "convtasnet-small.yaml")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", str(wrapper), yaml,
           "--distributed_backend=gloo", f"--output_folder={out}", "--noprogressbar",
           "--number_of_epochs=2", "--batch_size=2", f"--cache_folder={cache}",
           *SMALL_DATA, *TINY_MODEL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # each process trained on its own half of every epoch's 8 mixtures
    seen = [set((out / f"ids_rank{r}.txt").read_text().split("\n")) - {""} for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8  # 2 epochs x 4 mixtures
    assert not seen[0] & seen[1]
    for epoch in ("1", "2"):
        assert len({s for s in seen[0] | seen[1] if s.split()[0] == epoch}) == 8

    # the replicas stayed identical, and only process 0 wrote checkpoints
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6)
    assert any("model.ckpt" in w for w in ranks[0]["writes"])
    assert ranks[1]["writes"] == []
    assert (out / "test_summary.json").exists()
    assert proc.stdout.count("SI-SNRi") >= 1
