"""Recipes end to end: a --debug run of every yaml, resume, bf16, non-finite skipping, oracle."""

import csv
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from speechbrain.dataio.batch import PaddedBatch

from conftest import ROOT, load_recipe

RECIPE = os.path.join(ROOT, "recipes", "separation")
YAMLS = sorted(glob.glob(os.path.join(RECIPE, "hparams", "*.yaml")))
SMALL_DATA = ["--train_mixtures_per_epoch=8", "--n_valid=2", "--n_test=2", "--segment_seconds=1",
              "--eval_max_seconds=2", "--n_audio_examples=1"]
TINY_MODEL = ["--N=16", "--L=16", "--B=16", "--H=32", "--Sc=16", "--X=2", "--R=1"]
# The paper-size MossFormer2 yamls are debug-run with every width as configured but 2 of their
# 24/25 layers: one full-depth training step takes minutes on 2 CPU cores.
# tests/test_mossformer2.py builds their full-depth models and checks the parameter counts.
DEBUG_OVERRIDES = {"mossformer2.yaml": ["--num_layers=2"], "mossformer2-s.yaml": ["--num_layers=2"]}


def run_recipe(script, yaml, out, *args):
    cmd = [sys.executable, os.path.join(RECIPE, script), yaml, f"--output_folder={out}",
           "--noprogressbar", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("yaml", YAMLS, ids=[os.path.basename(y) for y in YAMLS])
def test_debug_run_of_every_yaml(yaml, tmp_path, cache):
    out = tmp_path / "out"
    log = run_recipe("train.py", yaml, out, "--debug", f"--cache_folder={cache}", *SMALL_DATA,
                     *DEBUG_OVERRIDES.get(os.path.basename(yaml), []))
    assert "SI-SNRi" in log and "NOT real speech" in log
    from modules.training.memory import compact_memory_requested

    # a compact_memory yaml restarts itself once under the allocator settings, then runs
    assert log.count("compact_memory: restarting under") == int(compact_memory_requested(yaml, ""))
    with open(out / "test_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["snt_id", "si-snr", "si-snr_i", "sdr", "sdr_i"]
    assert all(np.isfinite(float(r["si-snr_i"])) for r in rows)
    summary = json.loads((out / "test_summary.json").read_text())
    assert summary["n_mixtures"] == len(rows)
    ex = out / "examples" / rows[0]["snt_id"]
    assert (ex / "spectrogram.png").stat().st_size > 1000
    with open(yaml) as f:
        rate = int(re.search(r"^sample_rate:\s*(\d+)", f.read(), re.M).group(1))
    for wav in ("mixture", "estimate1", "estimate2", "reference1", "reference2"):
        x, sr = sf.read(ex / f"{wav}.wav")
        assert sr == rate and np.abs(x).max() <= 0.99 + 1e-4  # never clipped


def test_bf16_precision_runs(tmp_path, cache):
    yaml = os.path.join(RECIPE, "hparams", "convtasnet-small.yaml")
    log = run_recipe("train.py", yaml, tmp_path / "bf16", "--debug", "--precision=bf16",
                     f"--cache_folder={cache}", *SMALL_DATA, *TINY_MODEL)
    assert "precision=bf16" in log


def test_resume_from_checkpoint(tmp_path, cache):
    yaml = os.path.join(RECIPE, "hparams", "convtasnet-small.yaml")
    out = tmp_path / "resume"
    args = [f"--cache_folder={cache}", *SMALL_DATA, *TINY_MODEL, "--batch_size=2"]
    run_recipe("train.py", yaml, out, "--number_of_epochs=1", *args)
    log = (out / "train_log.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in log if line.startswith("epoch")] == ["epoch: 1"]
    second = run_recipe("train.py", yaml, out, "--number_of_epochs=2", *args)
    assert "Loading a checkpoint" in second
    epochs = [line.split(",")[0] for line in (out / "train_log.txt").read_text().splitlines()
              if line.startswith("epoch")]
    assert epochs == ["epoch: 1", "epoch: 2"]  # epoch 1 was not trained again
    assert "trained 2 epochs" in second


def test_nonfinite_loss_skips_the_update():
    from modules.models.convtasnet import ConvTasNet

    train = load_recipe("separation")
    model = ConvTasNet(N=8, L=8, B=8, H=8, Sc=8, X=1, R=1)
    brain = train.SeparationBrain(modules={"model": model}, opt_class=lambda p: torch.optim.Adam(p, 1e-2),
                                  hparams={}, run_opts={"device": "cpu", "skip_nonfinite_grads": True,
                                                        "nonfinite_patience": 5})
    brain.init_optimizers()

    def batch(mix):
        return PaddedBatch([{"id": "x", "mix": mix, "sources": torch.stack([mix, -mix], -1)}])

    before = [p.detach().clone() for p in model.parameters()]
    bad = torch.randn(400)
    bad[10] = float("nan")
    brain.step, brain.nonfinite_count = 0, 0
    brain.fit_batch(batch(bad))
    assert brain.nonfinite_count == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    brain.fit_batch(batch(torch.randn(400)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_oracle_masks_on_generated_data(tmp_path, cache):
    yaml = os.path.join(RECIPE, "hparams", "stft-mask.yaml")
    log = run_recipe("oracle.py", yaml, tmp_path / "oracle", f"--cache_folder={cache}", "--n_test=3")
    summary = json.loads((tmp_path / "oracle" / "oracle" / "oracle_summary.json").read_text())
    assert summary["n_mixtures"] == 3
    assert summary["irm"]["si-snr_i"] > 5 and summary["ibm"]["si-snr_i"] > 5
    assert "IRM" in log


def test_oracle_masks_on_real_speech(librispeech, tmp_path):
    from modules.data.mixing import SeparationData
    from modules.training.metrics import separation_metrics
    from modules.models.stft_mask import ideal_mask_separation

    test = SeparationData(librispeech, save_folder=str(tmp_path), n_test=3, n_valid=1,
                          eval_max_seconds=3).datasets()["test"]
    for i in range(3):
        item = test[i]
        est = ideal_mask_separation(item["mix"], item["sources"], "irm")
        m, _ = separation_metrics(item["mix"], est, item["sources"], with_sdr=False)
        assert m["si-snr_i"] > 8, m  # real 2-speaker speech is highly separable by oracle masks


def _end_of_epoch_weights(out):
    import yaml

    for d in sorted(os.listdir(out / "save")):
        meta_path = out / "save" / d / "CKPT.yaml"
        if d.startswith("CKPT+") and yaml.safe_load(meta_path.read_text()).get("end-of-epoch"):
            return torch.load(out / "save" / d / "model.ckpt", weights_only=True)
    raise AssertionError(f"no end-of-epoch checkpoint in {out}/save")


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, cache):
    """Kill -9 right after an intra-epoch checkpoint, rerun the same command: the finished
    model equals that of a run that was never interrupted (the lost steps are redone on the
    same data, which is drawn from (seed, epoch, index))."""
    import signal
    import time

    yaml = os.path.join(RECIPE, "hparams", "convtasnet-small.yaml")
    data = [a for a in SMALL_DATA if not a.startswith("--train_mixtures_per_epoch")]
    args = ["--number_of_epochs=1", "--train_mixtures_per_epoch=200", "--batch_size=2",
            "--ckpt_interval_minutes=0", "--ckpt_interval_steps=20", f"--cache_folder={cache}",
            *data, *TINY_MODEL]
    run_recipe("train.py", yaml, tmp_path / "a", *args)
    reference = _end_of_epoch_weights(tmp_path / "a")

    out = tmp_path / "b"
    cmd = [sys.executable, os.path.join(RECIPE, "train.py"), yaml, f"--output_folder={out}",
           "--noprogressbar", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # optimizer.ckpt is the last file speechbrain writes into a checkpoint folder: kill a
        # few steps after the first intra-epoch checkpoint is complete, well before the next
        if glob.glob(str(out / "save" / "CKPT+*" / "optimizer.ckpt")):
            time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "test_results.csv").exists()
    log = run_recipe("train.py", yaml, out, *args)
    assert "Loading a checkpoint" in log
    resumed = _end_of_epoch_weights(out)
    for name, value in reference.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name


def test_tensorboard_logging(tmp_path, cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    yaml = os.path.join(RECIPE, "hparams", "convtasnet-small.yaml")
    out = tmp_path / "tb"
    run_recipe("train.py", yaml, out, "--number_of_epochs=2", "--use_tensorboard=True",
               "--tensorboard_interval=2", f"--cache_folder={cache}", *SMALL_DATA, *TINY_MODEL)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_step", "train/loss", "valid/si-snr", "valid/lr"} <= tags
    assert [e.step for e in acc.Scalars("valid/si-snr")] == [1, 2]
    assert [e.step for e in acc.Scalars("train/loss_step")] == [2, 4]  # 2 x 2 updates of 4


def test_compact_memory_key_and_override(tmp_path, caplog):
    from modules.training.memory import compact_memory_env, compact_memory_requested, restart_with_compact_memory

    yaml = tmp_path / "x.yaml"
    yaml.write_text("seed: 1\ncompact_memory: True   # comment\n")
    assert compact_memory_requested(str(yaml), "")
    assert not compact_memory_requested(str(yaml), "compact_memory: False\n")
    yaml.write_text("seed: 1\n")
    assert not compact_memory_requested(str(yaml), "")
    assert compact_memory_requested(str(yaml), {"compact_memory": True})
    # called from Python (argv given): never re-executes, says what to set instead
    with caplog.at_level("WARNING"):
        restart_with_compact_memory(["x.yaml"])
    env = compact_memory_env()
    assert all(f"{k}={v}" in caplog.text for k, v in env.items()) or all(
        os.environ.get(k) == v for k, v in env.items())


def test_peer_run_trains_speechbrain_s_lobes_under_our_recipe(tmp_path, cache):
    """bench/peer_convtasnet.py is the separation recipe with SpeechBrain's Conv-TasNet lobes as
    its model: same data, loss and test; the run's saved yaml and log name the peer's model."""
    out = tmp_path / "peer"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "peer_convtasnet.py"), f"--output_folder={out}",
           "--noprogressbar", "--debug", f"--cache_folder={cache}", *SMALL_DATA, *TINY_MODEL]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "model: SpeechBrainLobes" in log and "SI-SNRi" in log
    saved = (out / "hyperparams.yaml").read_text()
    assert "!new:bench.peer_convtasnet.SpeechBrainLobes" in saved and "convtasnet.TCN" not in saved
    summary = json.loads((out / "test_summary.json").read_text())
    assert summary["n_mixtures"] == 2 and np.isfinite(summary["si-snr_i"])
