#!/usr/bin/env python3
"""Train and evaluate a speech separation model (Conv-TasNet, STFT-mask baseline, ...).

Usage::

    python recipes/separation/train.py recipes/separation/hparams/convtasnet-small.yaml \
        [--data_folder=<corpus>] [--max_train_minutes=30] [--precision=bf16] [--debug]

Any yaml key can be overridden on the command line. Without ``--data_folder`` a synthetic
speech-like corpus is generated (not real speech). The model is whatever ``model`` the yaml
builds: an :class:`~modules.models.base.EncoderMaskerDecoder`, which maps a mixture
``[batch, time]`` to ``[batch, time, n_src]`` and, given the sources, returns its own training
loss per mixture (negative PIT SI-SNR by default; deep clustering has its own). Validation and
test score the separations of every model the same way. The test stage writes
``test_results.csv`` (one row per mixture), ``test_summary.json``, and a few example
separations (WAV + spectrogram PNG) under ``<output_folder>/examples``.
"""

from __future__ import annotations

import logging
import os
import sys

import speechbrain as sb
from speechbrain.utils.distributed import if_main_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # `import modules` without installing the project
    sys.path.insert(0, ROOT)

from modules.data.audio import match_level, plot_separation, write_audio  # noqa: E402
from modules.training.brain import BaseBrain, train_and_test  # noqa: E402
from modules.models.losses import pit_si_snr_loss  # noqa: E402
from modules.training.metrics import METRIC_NAMES, separation_metrics  # noqa: E402

logger = logging.getLogger(__name__)


class SeparationBrain(BaseBrain):
    """SI-SNR + PIT training of any ``[batch, time] -> [batch, time, n_src]`` model."""

    test_metrics = tuple(METRIC_NAMES)

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        self._batch_ids = batch.id
        if stage == sb.Stage.TRAIN:  # the model's own objective, loss per mixture
            return self.modules.model(batch.mix.data, batch.sources.data)
        return self.modules.model(batch.mix.data)

    def compute_objectives(self, out, batch, stage):
        if stage == sb.Stage.TRAIN:
            return out.mean()
        ref = batch.sources.data.float()
        est = out.float()
        self._score(batch, est.detach(), ref, stage)
        return pit_si_snr_loss(est, ref).mean()

    def _score(self, batch, est, ref, stage):
        mix = batch.mix.data.float()
        lengths = (batch.mix.lengths * mix.shape[1]).round().long()
        for b, uid in enumerate(batch.id):
            n = int(lengths[b])
            m, metrics_est = separation_metrics(mix[b, :n], est[b, :n], ref[b, :n],
                                                with_sdr=stage == sb.Stage.TEST)
            self.accumulate(m)
            if stage == sb.Stage.TEST:
                self.test_rows.append({"snt_id": uid, **m})
                if len(self.test_rows) <= self.hparams.n_audio_examples:
                    self._save_example(uid, mix[b, :n], metrics_est, ref[b, :n], m)

    def _save_example(self, uid, mix, est, ref, metrics):
        if not if_main_process():  # every DDP process evaluates; one writes
            return
        folder = os.path.join(self.hparams.output_folder, "examples", uid)
        sr = self.hparams.sample_rate
        write_audio(os.path.join(folder, "mixture.wav"), mix, sr)
        est = match_level(est, mix)
        for j in range(est.shape[1]):
            write_audio(os.path.join(folder, f"estimate{j + 1}.wav"), est[:, j], sr)
            write_audio(os.path.join(folder, f"reference{j + 1}.wav"), ref[:, j], sr)
        plot_separation(os.path.join(folder, "spectrogram.png"), mix.cpu(), est.cpu(), ref.cpu(), sr,
                        title=f"{uid}: SI-SNRi {metrics['si-snr_i']:.1f} dB")


def run(argv=None):
    """Train (unless ``--test_only``) and test; returns the test summary dict."""
    return train_and_test(SeparationBrain, argv, print_summary)


def print_summary(hparams, s):
    out = os.path.abspath(hparams["output_folder"])
    what = ("overfit check on %d training mixtures" % hparams["overfit_mixtures"]
            if hparams.get("overfit_mixtures") else "test set")
    data = hparams["data_folder"] or "synthetic speech-like corpus (NOT real speech)"
    print("\n" + "=" * 78)
    print(f"{hparams['experiment_name']}: {what}, {s['n_mixtures']} mixtures of {data}")
    print(f"  trained {s['epochs']} epochs in {s['train_minutes']:.1f} min; {s['params_M']:.2f} M params")
    print(f"  SI-SNR  {s['si-snr']:6.2f} dB   SI-SNRi {s['si-snr_i']:6.2f} dB "
          f"(± {s['si-snr_i_std']:.2f})")
    print(f"  SDR     {s['sdr']:6.2f} dB   SDRi    {s['sdr_i']:6.2f} dB")
    if hparams.get("overfit_mixtures"):
        verdict = "PASS" if s["si-snr"] > 20 else "FAIL (a correct implementation passes 20 dB)"
        print(f"  overfit check: {verdict}")
    print(f"  per-mixture metrics: {out}/test_results.csv")
    print(f"  summary:             {out}/test_summary.json")
    print(f"  example separations: {out}/examples/<id>/"
          "{mixture,estimate*,reference*}.wav + spectrogram.png")
    print(f"  training log:        {out}/train_log.txt; checkpoints in {out}/save")
    print("=" * 78)


if __name__ == "__main__":
    run()
