#!/usr/bin/env python3
"""Train and evaluate target-speaker extraction (WavLMTasNet, WavLMDynamicTasNet, STFTMaskExtractor).

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
SI-SDRi, SI-SDR against the interferer, whether the output is closer to the interferer than to
the target, the speaker-similarity verdict, and the same for the mixture passed through: see
``ExtractionBrain``), ``test_summary.json`` (their means: SI-SDRi, target and speaker confusion rates) and a few examples
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
from modules.models.speaker import GE2EEncoder  # noqa: E402
from modules.models.tse import EXTRACTION_METRICS, extraction_metrics  # noqa: E402
from modules.training.metrics import SPEAKER_VERDICTS, speaker_verdicts  # noqa: E402

logger = logging.getLogger(__name__)


def real_lengths(padded) -> torch.Tensor:
    """Samples of each item of a SpeechBrain ``PaddedData`` (relative lengths -> samples)."""
    return (padded.lengths * padded.data.shape[1]).round().long()


SPEAKER_COLUMNS = tuple(f"spk_{v}" for v in SPEAKER_VERDICTS)
PASSTHROUGH_COLUMNS = ("passthrough_si-sdr", "passthrough_confused",
                       *(f"passthrough_{c}" for c in SPEAKER_COLUMNS))


class ExtractionBrain(BaseBrain):
    """SI-SDR training of ``model(mix, enroll, mix_lens, enroll_lens) -> [batch, time]``.

    Each test row holds the extraction metrics, the speaker-similarity verdict of the estimate
    (``spk_correct`` / ``spk_ambiguous`` / ``spk_confused``: is its GE2E d-vector closer to the
    target's than to the interferer's, by more than ``speaker_margin`` in cosine; both taken on
    their clean signals in the mixture) and the same figures for the mixture passed through
    unchanged (the baseline). Without the GE2E weights the speaker columns are left out."""

    test_keys = ("snt_id", "enroll_mode")

    @property
    def test_metrics(self):
        speaker = SPEAKER_COLUMNS if self.speaker_encoder() is not None else ()
        passthrough = [c for c in PASSTHROUGH_COLUMNS if speaker or "spk_" not in c]
        return (*EXTRACTION_METRICS, *speaker, *passthrough)

    def speaker_encoder(self):
        """The GE2E encoder of the test verdicts, built once; None when its weights are missing."""
        if not hasattr(self, "_speaker_encoder"):
            try:
                self._speaker_encoder = GE2EEncoder(sample_rate=self.hparams.sample_rate).to(self.device).eval()
            except FileNotFoundError as e:
                logger.warning("no speaker-similarity verdicts in the test results: %s", e)
                self._speaker_encoder = None
        return self._speaker_encoder

    def speaker_columns(self, mix, est, target, other) -> dict:
        """Speaker verdicts of the estimate and of the mixture (all ``[time]``)."""
        enc = self.speaker_encoder()
        if enc is None:
            return {}
        with torch.no_grad():
            emb = enc(torch.stack([est, mix, target, other]), cache=False)
        margin = getattr(self.hparams, "speaker_margin", 0.05)
        est_v, mix_v = speaker_verdicts(emb[:2], emb[2:3].expand(2, -1), emb[3:4].expand(2, -1), margin)
        return {**{f"spk_{v}": float(v == est_v) for v in SPEAKER_VERDICTS},
                **{f"passthrough_spk_{v}": float(v == mix_v) for v in SPEAKER_VERDICTS}}

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
                base = extraction_metrics(mix[b, :n], mix[b, :n], target[b, :n], other[b, :n])
                m.update({"passthrough_si-sdr": base["si-sdr"], "passthrough_confused": base["confused"]},
                         **self.speaker_columns(mix[b, :n], est[b, :n], target[b, :n], other[b, :n]))
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
        if "spk_confused" in summary:
            summary["speaker_confusion_rate"] = summary["spk_confused"]
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
    print(f"{hparams['experiment_name']}: {s.get('test_split', 'test')} set, {s['n_mixtures']} mixtures of {data}")
    if s["epochs"]:
        trained = (f"trained {s['epochs']} epochs in {s['train_minutes']:.1f} min (best by valid "
                   f"{hparams['valid_metric']}: epoch {s['best_epoch']})")
    else:
        trained = f"not trained here (weights: {hparams.get('init_from') or 'as built'})"
    print(f"  {trained}; {s['params_M']:.2f} M params ({s['trained_params_M']:.2f} M trainable); "
          f"enrolment: {', '.join(s['enroll_modes'])}")
    print(f"  SI-SDR  {s['si-sdr']:6.2f} dB   SI-SDRi {s['si-sdr_i']:6.2f} dB (± {s['si-sdr_i_std']:.2f})")
    print(f"  SI-SDR confusion  {100 * s['target_confusion_rate']:5.1f} % (outputs closer to the "
          f"interferer than to the target); mixture passed through: {100 * s['passthrough_confused']:.1f} %")
    if "spk_confused" in s:
        print(f"  speaker confusion {100 * s['spk_confused']:5.1f} %, ambiguous {100 * s['spk_ambiguous']:.1f} % "
              f"(GE2E d-vectors); mixture passed through: {100 * s['passthrough_spk_confused']:.1f} %, "
              f"ambiguous {100 * s['passthrough_spk_ambiguous']:.1f} %")
    print(f"  per-mixture metrics: {out}/test_results.csv")
    print(f"  summary:             {out}/test_summary.json")
    print(f"  examples:            {out}/examples/<id>/{{mixture,enrollment,estimate,target}}.wav")
    print(f"  training log:        {out}/train_log.txt; checkpoints in {out}/save")
    print("=" * 78)


if __name__ == "__main__":
    run()
