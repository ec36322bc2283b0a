#!/usr/bin/env python3
"""Share of a training step that waits for data.

    python bench/pipeline.py <recipe> <yaml> [--steps 40] [--workers 0,1,2] [yaml overrides...]
    python bench/pipeline.py separation recipes/separation/hparams/convtasnet-small.yaml \
        --data_folder=../shared/data/LibriSpeech

Builds the recipe exactly as ``train.py`` does (``modules.training.brain.setup_recipe``), then
runs ``--steps`` training updates (``Brain.fit_batch``) from the training loader, timing apart
the wait for each batch (``next(loader)``) and the update. For each ``num_workers`` (0: the
crops are made in the training process, between updates; >= 1: by worker processes while the
update runs) it prints the mean wait, the mean update and the wait's share of the step. The first
``--warmup`` steps are not counted (worker start-up, first-call allocations).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import speechbrain as sb
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules.training.brain import setup_recipe  # noqa: E402


def brain_class(recipe: str):
    path = os.path.join(ROOT, "recipes", recipe, "train.py")
    spec = importlib.util.spec_from_file_location(f"{recipe}_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__
               and hasattr(v, "fit_batch")]
    if len(classes) != 1:
        raise SystemExit(f"{path} defines {len(classes)} Brain classes; expected one")
    return classes[0]


def measure(cls, argv, workers: int, steps: int, warmup: int):
    brain, hparams, sets = setup_recipe(cls, [*argv, "--noprogressbar"])
    opts = dict(hparams["dataloader_opts"], num_workers=workers)
    if not workers:
        opts.pop("prefetch_factor", None)
    loader = brain.make_dataloader(sets["train"], stage=sb.Stage.TRAIN, **opts)
    brain.on_fit_start()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    brain.modules.train()
    it = iter(loader)
    waits, updates = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        brain.fit_batch(batch)
        t2 = time.perf_counter()
        if step >= warmup:
            waits.append(t1 - t0)
            updates.append(t2 - t1)
    return sum(waits) / steps, sum(updates) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", choices=("separation", "target_speaker", "timbre"))
    p.add_argument("yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", default="0,1", help="num_workers values, comma-separated")
    a, overrides = p.parse_known_args(argv)
    cls = brain_class(a.recipe)
    rows = []
    for w in (int(x) for x in a.workers.split(",")):
        out = os.path.join("/tmp", f"pipeline_bench_{os.getpid()}_{w}")
        wait, update = measure(cls, [a.yaml, f"--output_folder={out}", *overrides], w, a.steps, a.warmup)
        rows.append((w, wait, update))
    print(f"\n{os.path.basename(a.yaml)}: {a.steps} updates ({torch.get_num_threads()} threads)")
    print(f"{'num_workers':>11s} {'wait for data (ms)':>19s} {'update (ms)':>12s} {'data share':>11s}")
    for w, wait, update in rows:
        print(f"{w:11d} {1000 * wait:19.1f} {1000 * update:12.1f} {100 * wait / (wait + update):10.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
