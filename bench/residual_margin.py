#!/usr/bin/env python3
"""Would judging the whole output help a trained GE2E extractor? A residual check, margin by margin.

    python bench/residual_margin.py recipes/target_speaker/hparams/stft_mask_ge2e.yaml \
        --init_from=results/tse/<run> --hop_length=128 --data_folder=../shared/data/speechocean762 \
        --n_valid=200 [--split valid] [--margins 0,0.05,0.1,0.2]

The arguments after the yaml are the extraction recipe's (``recipes/target_speaker/train.py``):
the same yaml, trained weights (``--init_from``) and the model options of the run. For every
mixture of ``--split`` (default ``valid``: the validation speakers, so the margin is chosen
without the test set) the model's estimate and the rest of the mixture (``mixture - estimate``)
are scored against the target (SI-SDRi, SI-SDR confusion) and embedded with the model's frozen
GE2E encoder. The check returns the rest instead of the estimate where the rest's d-vector is
closer to the enrolment's by more than a margin (cosine): the judgement separate-then-select
makes over whole separated sources. The table gives, for no check and for each margin, the mean
SI-SDRi, the SI-SDR confusion and how often the rest replaces the estimate, with the oracle
choice of the two (the better SI-SDR per mixture) as the ceiling. Measured, it did not help on
the test speakers (docs/RESULTS.md), so the models do not offer it.
"""

from __future__ import annotations

import argparse
import os
import sys

import speechbrain as sb
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules.models.speaker import sample_lengths  # noqa: E402
from modules.models.tse import extraction_metrics  # noqa: E402
from modules.training.brain import setup_recipe  # noqa: E402
from pipeline import brain_class  # noqa: E402


@torch.no_grad()
def score(brain, dataset, loader_kwargs) -> list[dict]:
    """Per mixture: SI-SDRi and confusion of the estimate and of the rest, and the cosine of each
    one's d-vector with the enrolment's."""
    model = brain.modules.model.eval()
    if getattr(model, "ge2e", None) is None:
        raise SystemExit("error: this model has no GE2E encoder (the residual check needs one: "
                         "stft_mask_ge2e.yaml, or wavlm_tasnet*.yaml with --speaker_encoder=ge2e)")
    rows = []
    loader = brain.make_dataloader(dataset, stage=sb.Stage.TEST, **loader_kwargs)
    for batch in tqdm(loader, desc="scoring", dynamic_ncols=True):
        mix, enroll = batch.mix.data, batch.enroll.data
        est = model(mix, enroll, batch.mix.lengths, batch.enroll.lengths)
        speaker = model.speaker_embedding(enroll, batch.enroll.lengths)
        for b, n in enumerate(sample_lengths(mix, batch.mix.lengths).tolist()):
            m, e = mix[b, :n], est[b, :n]
            target, other = batch.target.data[b, :n], batch.interferer.data[b, :n]
            cos = model.ge2e(torch.stack([e, m - e]), cache=False) @ speaker[b]
            rows.append({"est": extraction_metrics(m, e, target, other),
                         "rest": extraction_metrics(m, m - e, target, other),
                         "cos_est": float(cos[0]), "cos_rest": float(cos[1])})
    return rows


def table(rows, margins) -> str:
    def line(name, pick):
        chosen = [r["rest"] if pick(r) else r["est"] for r in rows]
        n = len(rows)
        return (f"| {name} | {sum(c['si-sdr_i'] for c in chosen) / n:.2f} | "
                f"{100 * sum(c['confused'] for c in chosen) / n:.1f} % | "
                f"{100 * sum(pick(r) for r in rows) / n:.1f} % |")

    out = ["| residual check | SI-SDRi dB | SI-SDR confusion | rest returned |", "|---|---|---|---|",
           line("off", lambda r: False)]
    out += [line(f"margin {m:g}", lambda r, m=m: r["cos_rest"] > r["cos_est"] + m) for m in margins]
    out.append(line("oracle (better SI-SDR of the two)", lambda r: r["rest"]["si-sdr"] > r["est"]["si-sdr"]))
    return "\n".join(out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    p.add_argument("--margins", default="0,0.05,0.1,0.2")
    own, recipe_args = p.parse_known_args(argv)
    if not recipe_args or recipe_args[0].startswith("-"):
        raise SystemExit("usage: python bench/residual_margin.py <extraction yaml> --init_from=<run> "
                         "[recipe overrides] [--split valid|test] [--margins 0,0.05,...]")
    margins = [float(m) for m in own.margins.split(",")]
    out = os.path.join(ROOT, "results", "bench", "residual_margin")
    brain, hparams, sets = setup_recipe(brain_class("target_speaker"), [*recipe_args, f"--output_folder={out}"])
    rows = score(brain, sets[own.split], hparams["eval_dataloader_opts"])
    print(f"\n{len(rows)} {own.split} mixtures of {hparams['data_folder']}, weights {hparams['init_from']}\n")
    print(table(rows, margins))


if __name__ == "__main__":
    main()
