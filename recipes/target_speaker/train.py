#!/usr/bin/env python3
"""Train and evaluate target-speaker extraction with WavLM (WavLMTasNet, WavLMDynamicTasNet).

Usage::

    python recipes/target_speaker/train.py recipes/target_speaker/hparams/wavlm_dynamic_tasnet-tiny.yaml \
        --data_folder=../shared/data/free-spoken-digit/recordings --speaker_pattern='^\\d+_([a-z]+)_\\d+$' \
        [--max_train_minutes=15] [--debug]

Any yaml key can be overridden on the command line. Each example is a mixture of ``num_spks``
speakers, the first being the target, and an enrolment utterance of the target speaker (see
``modules.data.enrolment.TSEData``: another utterance of the speaker when the corpus has one, else a
non-overlapping crop of the target's own utterance). The model is whatever ``model`` the yaml
builds: ``model(mix, enroll, mix_lens, enroll_lens) -> [batch, time]``. Training minimises the
negative SI-SDR against the target (no PIT). The test stage writes ``test_results.csv`` (SI-SDR,
SI-SDRi, SI-SDR against the interferer, and whether the output is closer to the interferer than to
the target), ``test_summary.json`` (mean SI-SDRi, target confusion rate) and a few examples
(mixture, enrolment, estimate, target WAVs) under ``<output_folder>/examples``.
"""

from __future__ import annotations

import logging
import os
import sys

import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # `import modules` without installing the project
    sys.path.insert(0, ROOT)

from modules.data.audio import match_level, write_audio  # noqa: E402
from modules.training.brain import BaseBrain, train_and_test  # noqa: E402
from modules.models.losses import si_snr  # noqa: E402
from modules.models.tse import EXTRACTION_METRICS, extraction_metrics  # noqa: E402

logger = logging.getLogger(__name__)


def real_lengths(padded) -> torch.Tensor:
    """Samples of each item of a SpeechBrain ``PaddedData`` (relative lengths -> samples)."""
    return (padded.lengths * padded.data.shape[1]).round().long()


class ExtractionBrain(BaseBrain):
    """SI-SDR training of ``model(mix, enroll, mix_lens, enroll_lens) -> [batch, time]``."""

    test_metrics = tuple(EXTRACTION_METRICS)
    test_keys = ("snt_id", "enroll_mode")

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        self._batch_ids = batch.id
        return self.modules.model(batch.mix.data, batch.enroll.data, batch.mix.lengths,
                                  batch.enroll.lengths)

    def compute_objectives(self, est, batch, stage):
        est, target = est.float(), batch.target.data.float()
        lengths = real_lengths(batch.mix)
        # each item on its own real samples (batches may mix lengths)
        loss = torch.stack([-si_snr(est[b, :n], target[b, :n]) for b, n in enumerate(lengths.tolist())])
        if stage != sb.Stage.TRAIN:
            self._score(batch, est.detach(), lengths, stage)
        return loss.mean()

    def _score(self, batch, est, lengths, stage):
        mix, target, other = (x.data.float() for x in (batch.mix, batch.target, batch.interferer))
        for b, uid in enumerate(batch.id):
            n = int(lengths[b])
            m = extraction_metrics(mix[b, :n], est[b, :n], target[b, :n], other[b, :n])
            self.accumulate(m)
            if stage == sb.Stage.TEST:
                self.test_rows.append({"snt_id": uid, "enroll_mode": batch.enroll_mode[b], **m})
                if len(self.test_rows) <= self.hparams.n_audio_examples and if_main_process():
                    enroll = batch.enroll.data[b, : int(real_lengths(batch.enroll)[b])]
                    self._save_example(uid, mix[b, :n], enroll, est[b, :n], target[b, :n])

    def _save_example(self, uid, mix, enroll, est, target):
        folder = os.path.join(self.hparams.output_folder, "examples", uid)
        sr = self.hparams.sample_rate
        write_audio(os.path.join(folder, "mixture.wav"), mix, sr)
        write_audio(os.path.join(folder, "enrollment.wav"), enroll, sr)
        write_audio(os.path.join(folder, "estimate.wav"), match_level(est[:, None], mix)[:, 0], sr)
        write_audio(os.path.join(folder, "target.wav"), target, sr)

    def finish_summary(self, summary):
        summary["target_confusion_rate"] = summary.pop("confused")
        summary.pop("confused_std")
        summary["enroll_modes"] = sorted({r["enroll_mode"] for r in self.test_rows})
        return summary


def run(argv=None):
    """Train and test; returns the test summary dict."""
    return train_and_test(ExtractionBrain, argv, print_summary)


def print_summary(hparams, s):
    out = os.path.abspath(hparams["output_folder"])
    data = hparams["data_folder"] or hparams.get("tse_lists") or \
        "synthetic speech-like corpus (NOT real speech)"
    print("\n" + "=" * 78)
    print(f"{hparams['experiment_name']}: test set, {s['n_mixtures']} mixtures of {data}")
    print(f"  trained {s['epochs']} epochs in {s['train_minutes']:.1f} min (best by valid "
          f"{hparams['valid_metric']}: epoch {s['best_epoch']}); {s['params_M']:.2f} M params "
          f"({s['trained_params_M']:.2f} M trained); enrolment: {', '.join(s['enroll_modes'])}")
    print(f"  SI-SDR  {s['si-sdr']:6.2f} dB   SI-SDRi {s['si-sdr_i']:6.2f} dB (± {s['si-sdr_i_std']:.2f})")
    print(f"  target confusion rate {100 * s['target_confusion_rate']:.1f} % "
          "(outputs closer to the interferer than to the target)")
    print(f"  per-mixture metrics: {out}/test_results.csv")
    print(f"  summary:             {out}/test_summary.json")
    print(f"  examples:            {out}/examples/<id>/{{mixture,enrollment,estimate,target}}.wav")
    print(f"  training log:        {out}/train_log.txt; checkpoints in {out}/save")
    print("=" * 78)


if __name__ == "__main__":
    run()
