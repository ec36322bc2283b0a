"""modules.training.memory.reuse_freed_memory: freed memory is reused inside the block (few page faults),
the process's allocator settings come back and free memory is returned after it, and Separator
runs its model inside it. Page faults are counted in fresh processes, whose heaps hold no big
free blocks yet."""

import json
import os
import subprocess
import sys

import pytest
import torch

from modules.training import memory
from modules.serving.inference import Separator
from conftest import ROOT, inference_yaml, load_recipe

pytestmark = pytest.mark.skipif(memory._glibc() is None, reason="glibc only")

SCRIPT = """
import json, resource, sys, torch
from modules.training.memory import reuse_freed_memory
from modules.models.mossformer2 import CONFIGS, MossFormer2

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

def faults_of_a_call():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = model(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, y

torch.manual_seed(0)
model = MossFormer2(**CONFIGS["tiny"]).eval()
x = torch.randn(1, 16000 * 20)  # activations of 40-160 MB: over glibc's largest mmap threshold
r = {}
with torch.inference_mode():
    with reuse_freed_memory(enabled=sys.argv[1] == "on") as active:
        r["active"] = active
        faults_of_a_call()
        with reuse_freed_memory(enabled=sys.argv[1] == "on"):
            pass  # leaving a nested block changes nothing
        r["second_call"], y = faults_of_a_call()
        r["rss_inside"] = rss_mb()
    r["rss_after"] = rss_mb()
    r["after"], _ = faults_of_a_call()
r["sum"] = y.double().sum().item()
print(json.dumps(r))
"""


def run(mode: str) -> dict:
    # one thread: with several, each thread allocates from its own malloc arena and the count
    # inside the block varies from run to run (docs/BENCHMARKS.md)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, check=True, env=env,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_memory_is_reused_inside_and_given_back_after():
    on, off = run("on"), run("off")
    assert on["active"] and not off["active"]
    assert on["sum"] == off["sum"]  # the same computation
    # by default every big activation is a fresh mapping whose pages fault in; inside the block
    # the second call finds all it needs in the heap
    assert off["second_call"] > 50_000
    assert on["second_call"] < off["second_call"] // 20
    # on leaving, the free heap memory is returned and big blocks are mapped afresh again
    assert on["rss_after"] < on["rss_inside"] - 200
    assert on["after"] > off["second_call"] // 10
    assert off["rss_after"] == pytest.approx(off["rss_inside"], abs=50)


class DepthRecorder(torch.nn.Module):
    """Halves the mixture into two sources; records whether reuse_freed_memory was active."""

    def __init__(self):
        super().__init__()
        self.active = []

    def forward(self, mix):
        self.active.append(memory._state["depth"] > 0)
        return torch.stack((mix / 2, mix / 2), dim=-1)


def test_separator_runs_its_model_reusing_freed_memory(tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "hyperparams.yaml").write_text(inference_yaml(X=1))
    from modules.models.convtasnet import ConvTasNet  # any loadable folder; the model is swapped below

    torch.save(ConvTasNet(N=16, L=16, B=16, H=32, Sc=16, X=1, R=1).state_dict(),
               folder / "model.ckpt")
    sep = Separator.from_hparams(source=str(folder), savedir=str(tmp_path / "saved"))
    assert not sep.reuse_freed_memory  # opt-in: a library call leaves the allocator alone
    sep.reuse_freed_memory = True
    sep.mods.model = DepthRecorder()
    mix = torch.randn(1, 4000)
    reused = sep.separate_batch(mix)
    sep.reuse_freed_memory = False
    torch.testing.assert_close(reused, sep.separate_batch(mix), rtol=0, atol=0)
    assert sep.mods.model.active == [True, False]
    assert memory._state["depth"] == 0


def test_compact_memory_prefers_tcmalloc_and_keeps_other_preloads(monkeypatch):
    monkeypatch.setattr(memory, "library_path", lambda name: None)
    assert memory.compact_memory_env() == memory.COMPACT_MEMORY_ENV  # glibc settings
    monkeypatch.setattr(memory, "library_path", lambda name: f"/usr/lib/{name}")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    tcmalloc = f"/usr/lib/{memory.TCMALLOC}"
    assert memory.compact_memory_env() == {"LD_PRELOAD": tcmalloc}
    monkeypatch.setenv("LD_PRELOAD", "/opt/libother.so")
    assert memory.compact_memory_env() == {"LD_PRELOAD": f"{tcmalloc}:/opt/libother.so"}
    monkeypatch.setenv("LD_PRELOAD", f"/opt/libother.so:{tcmalloc}")  # already there: as it is
    assert memory.compact_memory_env() == {"LD_PRELOAD": f"/opt/libother.so:{tcmalloc}"}


def test_a_recipe_trains_reusing_freed_memory_unless_turned_off(tmp_path, cache, monkeypatch):
    """Every training step of a recipe runs inside reuse_freed_memory (Conv-TasNet-small's step
    is faster with it, docs/BENCHMARKS.md); after the run the process's settings are back."""
    import os

    recipe = os.path.join(ROOT, "recipes", "separation")
    train = load_recipe("separation")
    depths = []
    fit_batch = train.SeparationBrain.fit_batch
    monkeypatch.setattr(train.SeparationBrain, "fit_batch",
                        lambda self, batch: depths.append(memory._state["depth"]) or fit_batch(self, batch))
    args = ["--debug", "--noprogressbar", f"--cache_folder={cache}", "--train_mixtures_per_epoch=4",
            "--n_valid=1", "--n_test=1", "--segment_seconds=0.5", "--eval_max_seconds=1",
            "--n_audio_examples=0", "--N=8", "--L=16", "--B=8", "--H=8", "--Sc=8", "--X=1", "--R=1"]
    yaml = os.path.join(recipe, "hparams", "convtasnet-small.yaml")
    train.run([yaml, f"--output_folder={tmp_path / 'a'}", *args])
    assert depths and all(d == 1 for d in depths)
    assert memory._state["depth"] == 0
    depths.clear()
    train.run([yaml, f"--output_folder={tmp_path / 'b'}", *args, "--train_reuse_freed_memory=False"])
    assert depths and all(d == 0 for d in depths)
