"""Target-speaker extraction end to end: data (enrolments, lists), a --debug run of every
recipes/target_speaker yaml, export -> TargetSpeakerExtractor round trip, and the CLI."""

import csv
import glob
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml as pyyaml

from conftest import ROOT, SPEECHOCEAN, inference_yaml, load_recipe, write_tone_corpus
from modules.data.corpora import Utterance
from modules.models.convtasnet import ConvTasNet
from modules.data.enrolment import ENROLL_GAP, TSEData, draw_extraction_spec, enroll_gap
from modules.data.report import report
from modules.models.wavlm import WavLM, tiny_wavlm_config

RECIPE = os.path.join(ROOT, "recipes", "target_speaker")
YAMLS = sorted(glob.glob(os.path.join(RECIPE, "hparams", "*.yaml")))
SMALL_DATA = ["--train_mixtures_per_epoch=4", "--n_valid=2", "--n_test=2", "--segment_seconds=0.6",
              "--enroll_seconds=0.8", "--min_enroll_seconds=0.3", "--eval_max_seconds=1",
              "--batch_size=2", "--n_audio_examples=1", "--noprogressbar"]
SMALL_MODEL = ["--encoder_dim=16", "--tcn_bottleneck=16", "--tcn_hidden=16", "--tcn_skip=16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 speakers x 2 utterances of tones (another utterance exists for every enrolment)."""
    return write_tone_corpus(str(tmp_path_factory.mktemp("tse") / "corpus"), n_speakers=6, utts=2)


@pytest.fixture(scope="module")
def tiny_wavlm_folder(tmp_path_factory):
    """A local HF-format WavLM folder (tiny, random weights) standing in for wavlm-base-plus."""
    folder = tmp_path_factory.mktemp("wavlm")
    WavLM(config=tiny_wavlm_config()).model.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- data


def fake_speakers(frames_per_utt, sample_rate=16000):
    """{speaker: [Utterance]} without audio (spec drawing needs only the lengths)."""
    by_speaker = {}
    for s, lengths in enumerate(frames_per_utt):
        by_speaker[f"s{s}"] = [Utterance(f"s{s}_u{k}", "", f"s{s}", n, sample_rate)
                               for k, n in enumerate(lengths)]
    return by_speaker


@pytest.mark.parametrize("segment_seconds", [3.0, None])
def test_enrolment_from_the_same_utterance_never_overlaps_the_target(segment_seconds):
    by_speaker = fake_speakers([[26000], [200000], [60000], [41000]])  # 1.6 s .. 12.5 s, one each
    rng = np.random.default_rng(0)
    for i in range(300):
        spec = draw_extraction_spec(rng, f"m{i}", sorted(by_speaker), by_speaker, 2, 8000, (-5, 5),
                                    segment_seconds=segment_seconds, max_seconds=6.0,
                                    speed_range=(0.9, 1.1), enroll_seconds=3.0, min_enroll_seconds=1.0)
        assert spec.enroll_mode == "same-utterance" and spec.enroll_utt == spec.utts[0]
        frames = next(u.frames for us in by_speaker.values() for u in us if u.id == spec.utts[0])
        used = int(np.ceil(spec.length * 16000 * spec.speeds[0] / (100 * 8000)))
        target = (spec.starts[0], spec.starts[0] + used)
        enroll = (spec.enroll_start, spec.enroll_start + spec.enroll_length)
        assert 0 <= target[0] and target[1] <= frames and 0 <= enroll[0] and enroll[1] <= frames
        gap = max(enroll[0] - target[1], target[0] - enroll[1])
        assert gap >= ENROLL_GAP, (spec, frames)
        assert spec.enroll_length >= min(16000, frames // 2)


def test_enrolment_from_another_utterance_when_there_is_one():
    by_speaker = fake_speakers([[20000, 30000, 5000], [40000, 9000]])
    rng = np.random.default_rng(1)
    for i in range(50):
        spec = draw_extraction_spec(rng, f"m{i}", sorted(by_speaker), by_speaker, 2, 16000, (-5, 5),
                                    segment_seconds=1.0, enroll_seconds=1.5)
        target_speaker = spec.utts[0].split("_")[0]
        assert spec.enroll_mode == "other-utterance" and spec.enroll_utt != spec.utts[0]
        assert spec.enroll_utt.startswith(target_speaker + "_")
        assert spec.enroll_length <= 24000


def test_tse_data_items_splits_and_fixed_sets(corpus, tmp_path, caplog):
    kw = dict(save_folder=str(tmp_path / "a"), cache_folder=str(tmp_path / "cache"),
              sample_rate=8000, segment_seconds=1.0, n_valid=3,
              n_test=3, train_mixtures_per_epoch=4, enroll_seconds=0.8)
    with caplog.at_level("INFO"):
        sets = TSEData(corpus, **kw).datasets()
    assert "a different utterance of the target speaker" in caplog.text
    speakers = {s: {u.speaker for u in sets[s].utts.values()} for s in sets}
    assert [len(speakers[s]) for s in ("train", "valid", "test")] == [2, 2, 2]  # 6 speakers
    item = sets["train"][0]
    assert set(item) == {"id", "mix", "target", "interferer", "enroll", "enroll_mode"}
    assert item["mix"].shape == item["target"].shape == item["interferer"].shape == (8000,)
    assert torch.allclose(item["mix"], item["target"] + item["interferer"], atol=1e-6)
    assert 0 < item["enroll"].shape[0] <= 6400
    again = TSEData(corpus, **{**kw, "save_folder": str(tmp_path / "b")}).datasets()
    for s in ("valid", "test"):
        assert [sets[s].spec(i) for i in range(3)] == [again[s].spec(i) for i in range(3)]
        assert torch.equal(sets[s][1]["enroll"], again[s][1]["enroll"])


def test_tse_lists_are_read(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for k in range(2):
        sigs = {n: (0.1 * rng.standard_normal(4000 + 800 * k)).astype(np.float32)
                for n in ("mix", "s1", "enroll")}
        for n, x in sigs.items():
            sf.write(tmp_path / f"{n}{k}.wav", x, 8000)
        rows.append({"mixture_ID": f"ex{k}", "mixture_path": f"mix{k}.wav", "target_path": f"s1{k}.wav",
                     "enrollment_path": f"enroll{k}.wav"})
    for split in ("train", "valid", "test"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    sets = TSEData(tse_lists=str(tmp_path), save_folder=str(tmp_path / "save"), sample_rate=8000,
                   segment_seconds=0.25, enroll_seconds=0.3).datasets()
    item = sets["test"][1]
    assert item["id"] == "ex1" and item["mix"].shape == (4800,) and item["enroll"].shape == (2400,)
    assert torch.allclose(item["interferer"], item["mix"] - item["target"])
    assert sets["train"][0]["mix"].shape == (2000,)
    # the report counts rows, flags an enrolment that is the target file, names missing entries
    with open(tmp_path / "test.csv", "a", newline="") as f:
        f.write("ex2,mix0.wav,s10.wav,s10.wav\nex3,gone.wav,s10.wav,enroll0.wav\n")
    text = report(TSEData(tse_lists=str(tmp_path), save_folder=str(tmp_path / "save"),
                          sample_rate=8000))
    test_line = next(line for line in text.splitlines() if line.startswith("test "))
    assert test_line.split()[1] == "3" and test_line.split()[-1] == "1"
    assert "missing entries: 1" in text and "gone.wav" in text


def test_report_on_generated_tse_data(tmp_path):
    """Speakers with one utterance each: every enrolment is cut from the target's own
    utterance, and the report shows that none comes closer to its target crop than the gap."""
    folder = write_tone_corpus(str(tmp_path / "one_each"), n_speakers=9, utts=1, seconds=3.0)
    text = report(TSEData(folder, save_folder=str(tmp_path / "save"),
                          cache_folder=str(tmp_path / "cache"), sample_rate=8000, n_valid=4,
                          n_test=4, segment_seconds=1.0, enroll_seconds=1.0,
                          min_enroll_seconds=0.5), n_train_samples=20)
    lines = text.split("enrolments:")[1].strip().splitlines()
    assert [line.split()[0] for line in lines] == ["train", "valid", "test"]
    for line, n in zip(lines, (20, 4, 4)):
        assert f"{{'same-utterance': {n}}}" in line
        assert int(re.search(r"closest to its target crop: (\d+) samples", line).group(1)) >= ENROLL_GAP


def test_enrolment_per_speaker_when_corpora_are_pooled(tmp_path):
    """LibriSpeech-like corpus A (one utterance per speaker) with corpus B (several per speaker,
    as speechocean762): B's targets are enrolled with another utterance, A's with a crop of the
    target's own utterance that does not overlap the target crop."""
    a = write_tone_corpus(str(tmp_path / "A"), n_speakers=6, utts=1, seconds=3.0)
    b = write_tone_corpus(str(tmp_path / "B"), n_speakers=6, utts=3, seconds=2.0)
    data = TSEData([a, b], save_folder=str(tmp_path / "s"), cache_folder=str(tmp_path / "cache"),
                   sample_rate=8000, segment_seconds=1.0, enroll_seconds=1.0, min_enroll_seconds=0.5,
                   n_valid=20, n_test=20, train_mixtures_per_epoch=20, valid_fraction=0.34,
                   test_fraction=0.34)
    sets = data.datasets()
    modes = set()
    for split in ("train", "valid", "test"):
        ds = sets[split]
        for i in range(len(ds)):
            spec = ds.spec(i)
            target = ds.utts[spec.utts[0]]
            enroll = ds.utts[spec.enroll_utt]
            assert enroll.speaker == target.speaker
            if target.speaker.startswith("B:"):
                assert spec.enroll_mode == "other-utterance" and enroll.id != target.id
            else:
                assert spec.enroll_mode == "same-utterance" and enroll.id == target.id
                assert enroll_gap(spec, target, 8000) >= ENROLL_GAP
            modes.add(spec.enroll_mode)
    assert modes == {"other-utterance", "same-utterance"}
    item = sets["test"][0]
    assert torch.allclose(item["mix"], item["target"] + item["interferer"], atol=1e-6)


def test_training_enrolments_from_fixed_crops_are_embedded_once(tmp_path):
    """``enroll_crops: 2``: over three epochs each training utterance gives at most 2 enrolments
    (another utterance) or 2 x 2 (start or end of the target's own, as before), so the frozen
    GE2E encoder runs once per distinct enrolment; without the option nearly every item is new.
    Valid and test lists are the same either way, and own-utterance crops still avoid the target."""
    from modules.models.speaker import GE2EEncoder

    a = write_tone_corpus(str(tmp_path / "A"), n_speakers=6, utts=1, seconds=3.0)
    b = write_tone_corpus(str(tmp_path / "B"), n_speakers=6, utts=3, seconds=2.0)
    kw = dict(cache_folder=str(tmp_path / "cache"), sample_rate=8000, segment_seconds=1.0,
              enroll_seconds=1.0, min_enroll_seconds=0.5, n_valid=6, n_test=6,
              train_mixtures_per_epoch=30, valid_fraction=0.34, test_fraction=0.34)
    plain = TSEData([a, b], save_folder=str(tmp_path / "p"), **kw).datasets()
    fixed = TSEData([a, b], save_folder=str(tmp_path / "f"), enroll_crops=2, **kw).datasets()
    for split in ("valid", "test"):
        assert [plain[split].spec(i) for i in range(6)] == [fixed[split].spec(i) for i in range(6)]

    def embed_epochs(ds):
        enc = GE2EEncoder(sample_rate=8000)
        computed, compute = [], enc.compute
        enc.compute = lambda wav, n: computed.append(len(n)) or compute(wav, n)
        crops = {}
        for epoch in (1, 2, 3):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                spec, item = ds.spec(i), ds[i]
                enc(item["enroll"])
                crops.setdefault((spec.enroll_utt, spec.enroll_mode), set()).add(
                    (spec.enroll_start, spec.enroll_length, spec.enroll_peak))
                if spec.enroll_mode == "same-utterance":
                    assert enroll_gap(spec, ds.utts[spec.utts[0]], 8000) >= ENROLL_GAP
        return sum(computed), crops

    n_fixed, crops = embed_epochs(fixed["train"])
    assert all(len(c) <= (2 if mode == "other-utterance" else 4) for (_, mode), c in crops.items())
    assert {mode for _, mode in crops} == {"other-utterance", "same-utterance"}
    assert n_fixed == sum(len(c) for c in crops.values()) < 45
    n_plain, _ = embed_epochs(plain["train"])
    assert n_plain > 80                                   # of 90 items
    with pytest.raises(ValueError, match="enroll_crops must be 0"):
        TSEData([a, b], save_folder=str(tmp_path / "x"), enroll_crops=-1, **kw)


# ----------------------------------------------------------------------------- recipe


def run_recipe(yaml, out, *args):
    return load_recipe("target_speaker").run([yaml, f"--output_folder={out}", *args])


@pytest.mark.parametrize("yaml", YAMLS, ids=[os.path.basename(y) for y in YAMLS])
def test_debug_run_of_every_yaml(yaml, tmp_path, corpus, tiny_wavlm_folder):
    args = ["--debug", "--debug_batches=1", "--debug_epochs=1", f"--data_folder={corpus}",
            f"--cache_folder={tmp_path / 'cache'}", *SMALL_DATA]
    if "separate_then_select" in yaml:  # a tiny random separator folder stands for a trained one
        folder = tmp_path / "separator"
        folder.mkdir()
        torch.manual_seed(0)
        torch.save(ConvTasNet(N=16, L=16, B=16, H=32, Sc=16, X=2, R=1).state_dict(), folder / "model.ckpt")
        (folder / "hyperparams.yaml").write_text(inference_yaml())
        args += [f"--separator={folder}"]
    elif "wavlm" in os.path.basename(yaml) and "tiny" not in yaml:
        # the WavLM-base yamls on a tiny local HF folder (a random base-size WavLM would make
        # this test take minutes on a CPU): same code path, `wavlm_source: <folder>`
        args += [f"--wavlm_source={tiny_wavlm_folder}", *SMALL_MODEL]
        if "dynamic" in yaml:
            args += ["--num_hybrid_layers=1"]
    summary = run_recipe(yaml, tmp_path / "out", *args)
    with open(tmp_path / "out" / "test_results.csv") as f:
        rows = list(csv.DictReader(f))
    verdicts = ["spk_correct", "spk_ambiguous", "spk_confused"]
    assert rows and list(rows[0]) == ["snt_id", "enroll_mode", "si-sdr", "si-sdr_i",
                                      "si-sdr_interferer", "confused", *verdicts,
                                      "passthrough_si-sdr", "passthrough_confused",
                                      *[f"passthrough_{v}" for v in verdicts]]
    for r in rows:
        assert np.isfinite(float(r["si-sdr_i"])) and r["confused"] in ("0.0", "1.0")
        assert sum(float(r[v]) for v in verdicts) == 1.0
        assert sum(float(r[f"passthrough_{v}"]) for v in verdicts) == 1.0
        assert abs(float(r["passthrough_si-sdr"]) - (float(r["si-sdr"]) - float(r["si-sdr_i"]))) < 1e-4
    saved = json.loads((tmp_path / "out" / "test_summary.json").read_text())
    assert saved["n_mixtures"] == len(rows) == summary["n_mixtures"]
    assert 0.0 <= saved["target_confusion_rate"] <= 1.0 and "si-sdr_i" in saved
    assert saved["speaker_confusion_rate"] == saved["spk_confused"]
    assert saved["enroll_modes"] == ["other-utterance"]
    example = tmp_path / "out" / "examples" / rows[0]["snt_id"]
    for name in ("mixture", "enrollment", "estimate", "target"):
        assert (example / f"{name}.wav").exists()


def test_debug_run_on_two_corpora_from_the_command_line(tmp_path):
    """`--data_folder=[a, b]` (a YAML list through SpeechBrain's overrides): a one-utterance
    corpus and a several-utterance one give both kinds of enrolment in one run."""
    a = write_tone_corpus(str(tmp_path / "A"), n_speakers=6, utts=1, seconds=3.0)
    b = write_tone_corpus(str(tmp_path / "B"), n_speakers=6, utts=3, seconds=2.0)
    yaml = os.path.join(RECIPE, "hparams", "wavlm_tasnet-tiny.yaml")
    run_recipe(yaml, tmp_path / "out", "--debug", "--debug_batches=4", "--debug_epochs=1",
               f"--data_folder=[{a}, {b}]", f"--cache_folder={tmp_path / 'cache'}",
               *SMALL_DATA)
    saved = json.loads((tmp_path / "out" / "test_summary.json").read_text())
    assert saved["data_folder"] == [a, b]
    with open(tmp_path / "out" / "test_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["enroll_mode"] for r in rows} == {"other-utterance", "same-utterance"}


def test_test_split_valid_tests_the_validation_mixtures(tmp_path, corpus):
    """`--test_split=valid` runs the test stage on the validation set (its own count and
    mixtures, not the test set's), says so in the summary, and a bad split is refused."""
    yaml = os.path.join(RECIPE, "hparams", "stft_mask_ge2e.yaml")
    common = ["--number_of_epochs=0", f"--data_folder={corpus}", f"--cache_folder={tmp_path / 'cache'}",
              "--hidden=8", *[a for a in SMALL_DATA if "n_valid" not in a], "--n_valid=3"]
    test = run_recipe(yaml, tmp_path / "test", *common)
    valid = run_recipe(yaml, tmp_path / "valid", *common, "--test_split=valid")
    assert (test["n_mixtures"], valid["n_mixtures"]) == (2, 3)
    assert (test["test_split"], valid["test_split"]) == ("test", "valid")
    assert test["si-sdr_i"] != valid["si-sdr_i"]
    with pytest.raises(ValueError, match="test_split must be"):
        run_recipe(yaml, tmp_path / "bad", *common, "--test_split=train")


def test_every_switch_is_a_yaml_key():
    for name, keys in (("wavlm_dynamic_tasnet", ["num_hybrid_layers", "tau", "qkb", "hybrid_mask",
                                                 "freeze_wavlm", "qkb_fallback_fraction", "soft_scale"]),
                       ("wavlm_tasnet", ["fusion", "freeze_wavlm"])):
        for suffix in ("", "-tiny"):
            text = open(os.path.join(RECIPE, "hparams", f"{name}{suffix}.yaml")).read()
            for key in keys:
                assert re.search(rf"^{key}:", text, re.M), (name + suffix, key)
                assert f"!ref <{key}>" in text, (name + suffix, key)


def test_inference_yamls_match_their_recipes():
    """hparams/target_speaker/<name>.yaml builds the model of the recipe yaml of that name (same
    class, same argument values; the cheap check for the WavLM-base yamls, whose models are big)."""

    def model_block(text):
        block = text.split("\nmodel: !new:")[1].split("\n\n")[0]
        return block.split("\n")[0], dict(re.findall(r"^    (\w+): (.+?)\s*$", block, re.M))

    for path in sorted(glob.glob(os.path.join(ROOT, "hparams", "target_speaker", "*.yaml"))):
        recipe = os.path.join(RECIPE, "hparams", os.path.basename(path))
        assert os.path.exists(recipe), path
        recipe_text, text = open(recipe).read(), open(path).read()
        top = dict(re.findall(r"^(\w+):[ \t]*([^#\n]*?)[ \t]*(?:#.*)?$", recipe_text, re.M))
        cls, trained = model_block(recipe_text)
        inference_cls, served = model_block(text)
        assert cls == inference_cls, path
        assert set(trained) == set(served), path
        for key, ref in trained.items():
            if key in ("wavlm", "sample_rate"):
                continue
            value = top[re.fullmatch(r"!ref <(\w+)>", ref).group(1)]
            assert pyyaml.safe_load(value) == pyyaml.safe_load(served[key]), (path, key)
        assert top["sample_rate"] == re.search(r"^sample_rate: (\d+)", text, re.M).group(1)


# ----------------------------------------------------------------------------- interface


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus):
    from modules.serving.export import export

    base = tmp_path_factory.mktemp("tse_export")
    yaml = os.path.join(RECIPE, "hparams", "wavlm_dynamic_tasnet-tiny.yaml")
    data = [a for a in SMALL_DATA if not a.startswith(("--train_mixtures", "--n_valid", "--n_test"))]
    run_recipe(yaml, base / "train", "--number_of_epochs=1", f"--data_folder={corpus}", *data,
               "--train_mixtures_per_epoch=2", "--n_valid=1", "--n_test=1")
    hub = base / "hub"
    export(str(base / "train"), str(hub))  # finds hparams/target_speaker/<experiment>.yaml
    ckpt = glob.glob(str(base / "train" / "save" / "CKPT+*" / "model.ckpt"))[0]
    return hub, ckpt, base


def test_export_round_trip(exported, tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    from modules.serving.inference import TargetSpeakerExtractor

    hub, ckpt, _ = exported
    assert sorted(os.listdir(hub)) == ["README.md", "hyperparams.yaml", "model.safetensors"]
    card = (hub / "README.md").read_text()
    assert "SI-SDRi" in card and "target confusion rate" in card and "TargetSpeakerExtractor" in card
    with open(os.path.join(RECIPE, "hparams", "wavlm_dynamic_tasnet-tiny.yaml")) as f:
        model = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "x")})["model"].eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    tse = TargetSpeakerExtractor.from_hparams(source=str(hub), savedir=str(tmp_path / "loaded"))
    torch.manual_seed(0)
    mix, enroll = torch.randn(2, 6000), torch.randn(2, 5000)
    lens = torch.tensor([1.0, 0.7])
    with torch.no_grad():
        assert torch.equal(tse.extract_batch(mix, enroll, lens, lens.flip(0)),
                           model(mix, enroll, lens, lens.flip(0)))
    # a long mixture: chunks of 1 s overlapping by 0.25 s, each with the same enrolment
    tse.chunk_seconds, tse.overlap_seconds = 1.0, 0.25
    long = torch.randn(1, 20000)
    out = tse.extract_batch(long, enroll[:1])
    assert out.shape == (1, 20000) and torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.allclose(out[:, :6000], model(long[:, :8000], enroll[:1])[:, :6000], atol=1e-6)


def test_extract_file_resamples_and_downmixes(exported, tmp_path, caplog):
    from modules.data.audio import AudioError
    from modules.serving.inference import TargetSpeakerExtractor

    hub, _, _ = exported
    tse = TargetSpeakerExtractor.from_hparams(source=str(hub), savedir=str(tmp_path / "loaded"))
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "mix.wav", 0.1 * rng.standard_normal((16000, 2)), 16000)  # stereo, 16 kHz
    sf.write(tmp_path / "enroll.wav", 0.1 * rng.standard_normal(6000), 8000)
    with caplog.at_level("WARNING"):
        est = tse.extract_file(tmp_path / "mix.wav", tmp_path / "enroll.wav", output_dir=tmp_path / "o")
    assert "2 channels" in caplog.text
    assert est.shape == (1, 8000)
    assert (tmp_path / "o" / "mix_target.wav").exists()
    est16 = tse.extract_file(tmp_path / "mix.wav", tmp_path / "enroll.wav", channel=0,
                             resample_output=True)
    assert est16.shape == (1, 16000)
    sf.write(tmp_path / "short.wav", np.zeros(50), 8000)
    with pytest.raises(AudioError, match="enrolment has 50 samples"):
        tse.extract_file(tmp_path / "mix.wav", tmp_path / "short.wav")


def test_cli(exported, tmp_path):
    from modules.serving.extract import main

    hub, _, _ = exported
    rng = np.random.default_rng(1)
    folder = tmp_path / "mixes"
    folder.mkdir()
    for k in range(2):
        sf.write(folder / f"m{k}.wav", 0.1 * rng.standard_normal(7000), 8000)
    (folder / "broken.wav").write_bytes(b"not audio")
    sf.write(tmp_path / "enroll.wav", 0.1 * rng.standard_normal(6000), 8000)
    args = ["--enroll", str(tmp_path / "enroll.wav"), "--model", str(hub), "--out", str(tmp_path / "out")]
    assert main(["--mix", str(folder / "m0.wav"), *args]) == 0
    assert (tmp_path / "out" / "m0_target.wav").exists()
    assert main(["--mix", str(folder), *args]) == 2  # m0_target.wav exists: refused, nothing run
    assert main(["--mix", str(folder), *args, "--overwrite"]) == 1  # broken reported, others done
    assert (tmp_path / "out" / "m1_target.wav").exists()


@pytest.mark.skipif(not os.path.isdir(SPEECHOCEAN), reason="speechocean762 not beside the repository")
def test_speaker_verdicts_of_the_test_stage_on_real_speech():
    """The test stage's verdict names the speaker of an estimate: the target's own signal is
    `correct`, the interferer's `confused`, on two speechocean762 speakers."""
    import types

    import soundfile as sf

    from modules.data.corpora import scan_corpus
    brain = load_recipe("target_speaker").ExtractionBrain.__new__(load_recipe("target_speaker").ExtractionBrain)
    brain.hparams = types.SimpleNamespace(sample_rate=16000, speaker_margin=0.05)
    brain.device = "cpu"
    by_speaker = {}
    for u in scan_corpus(SPEECHOCEAN)[0]:
        by_speaker.setdefault(u.speaker, u.path)
    a, b = (torch.tensor(sf.read(p, dtype="float32")[0][:48000]) for p in list(by_speaker.values())[:2])
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    mix = a + b
    assert brain.speaker_columns(mix, a, a, b)["spk_correct"] == 1.0
    assert brain.speaker_columns(mix, b, a, b)["spk_confused"] == 1.0
    assert "spk_correct" in brain.test_metrics
