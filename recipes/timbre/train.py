#!/usr/bin/env python3
"""Train and evaluate timbre separation + transcription with deep clustering (TimbreNet).

Usage::

    python recipes/timbre/train.py recipes/timbre/hparams/timbre.yaml [--max_train_minutes=30]

Training examples are mixtures of ``train_instruments`` instruments rendered from Bach chorales
(see modules/data/music.py), drawn anew every epoch. The loss is deep clustering on the active
(pitch, frame) units (instrument = the stem with most energy in the unit) + focal losses on the
instrument-agnostic note and onset posteriors, balanced by ``balancer``. The test stage scores
each test set (``test2``, ``test3``: 2- and 3-instrument mixtures of unseen chorales) with
mir_eval and writes ``test<n>_results.csv``, ``test_summary.json`` and pictures under
``examples/test<n>/``.
"""

from __future__ import annotations

import logging
import os
import sys

import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from modules.training.brain import BaseBrain, train_and_test  # noqa: E402
from modules.models.clustering import deep_clustering_loss, focal_loss, leaky_deep_clustering_loss  # noqa: E402

DC_LOSSES = {"lowrank": deep_clustering_loss, "leaky": leaky_deep_clustering_loss}
from modules.models.timbre import evaluate_example, plot_example, unit_targets  # noqa: E402

logger = logging.getLogger(__name__)
METRICS = ["agnostic_onset_f1", "agnostic_offset_f1", "instrument_onset_f1",
           "oracle_clusters_onset_f1", "random_clusters_onset_f1", "cluster_accuracy"]


class TimbreBrain(BaseBrain):
    test_metrics = tuple(METRICS)
    test_keys = ("id", "instruments")
    count_name = "n_examples"

    @property
    def net(self):
        return getattr(self.modules.model, "module", self.modules.model)

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        self._batch_ids = batch.id
        return self.modules.model(batch.mix)

    def _targets(self, batch):
        fe = self.net.front_end
        return [{k: v.to(self.device) for k, v in unit_targets(fe, ex.stems, ex.notes).items()}
                for ex in batch.examples]

    def compute_objectives(self, out, batch, stage):
        targets = self._targets(batch)
        dc, note, onset = [], [], []
        dc_loss = DC_LOSSES[self.hparams.dc_loss]
        for i, tg in enumerate(targets):
            t = tg["owner"].shape[-1]
            emb = out["embeddings"][i, :, :, :t].flatten(1).T[None].float()
            dc.append(dc_loss(emb, tg["owner"].flatten()[None],
                                           tg["active"].flatten()[None].float())[0])
            note.append(focal_loss(out["note_logits"][i, :, :t].float(), tg["rolls"].amax(0),
                                   alpha=self.hparams.focal_alpha, gamma=self.hparams.focal_gamma))
            onset.append(focal_loss(out["onset_logits"][i, :, :t].float(), tg["onsets"].amax(0),
                                    alpha=self.hparams.focal_alpha, gamma=self.hparams.focal_gamma))
        parts = [torch.stack(x).mean() for x in (dc, note, onset)]
        total, weights = self.modules.balancer(parts)
        if stage != sb.Stage.TRAIN:
            self._score(out, targets, batch, stage)
        return total

    def _score(self, out, targets, batch, stage):
        fe = self.net.front_end
        for i, (ex, tg) in enumerate(zip(batch.examples, targets)):
            t = tg["owner"].shape[-1]
            item = {k: v[i, ..., :t].detach().cpu() for k, v in out.items()}
            tg_cpu = {k: v.cpu() for k, v in tg.items()}
            res = evaluate_example(item, tg_cpu, ex.notes, fe, seed=self.hparams.seed)
            m = {k: v for k, v in res.items() if k in METRICS}
            self.accumulate(m)
            if stage == sb.Stage.TEST:
                self.test_rows.append({"id": ex.id, "instruments": "+".join(ex.instruments), **m})
                if len(self.test_rows) <= self.hparams.n_examples and if_main_process():
                    folder = os.path.join(self.hparams.output_folder, "examples", self.test_name)
                    os.makedirs(folder, exist_ok=True)
                    plot_example(os.path.join(folder, f"{ex.id}.png"), item["units"], tg_cpu["rolls"],
                                 res["_labels"], res["_roll"], res["_match"], ex.instruments, fe,
                                 title=f"{ex.id}: per-instrument onset F1 {m['instrument_onset_f1']:.2f}")


def run(argv=None):
    """Train and test on every test set; returns the summary (one dict per test set)."""
    return train_and_test(TimbreBrain, argv, print_summary)


def print_summary(hparams, results):
    print(f"\nTimbreNet, {results['train_minutes']:.1f} min of training "
          f"({results['epochs']} epochs); results in {os.path.abspath(hparams['output_folder'])}")
    print(f"{'test set':10s} " + " ".join(f"{m:>24s}" for m in METRICS))
    for name in sorted(k for k in results if k.startswith("test")):
        print(f"{name:10s} " + " ".join(f"{results[name][m]:24.3f}" for m in METRICS))


if __name__ == "__main__":
    run()
