"""The Brain base shared by every recipe of the project, and a time-budgeted epoch counter.

:class:`BaseBrain` adds to ``speechbrain.Brain`` what every recipe here needs and nothing
task-specific:

* datasets that draw a new random set per epoch get ``set_epoch(epoch)`` before each epoch, so a
  resumed run sees the same data as an uninterrupted one;
* non-finite losses are reported with the ids of the batch; with ``skip_nonfinite_grads: True``
  (the default of our yamls) the optimiser step of that batch is skipped;
* the validation stage sets the next learning rate (``lr_scheduler`` in the yaml: halving on
  plateau, or :class:`BudgetedAnnealing` over the time budget), logs
  to ``train_logger`` and keeps the best checkpoints by the yaml's ``valid_metric`` /
  ``valid_metric_mode`` (e.g. ``si-snr``, ``max``);
* the test stage keeps one row per example in ``self.test_rows`` (the subclass appends them);
  :meth:`on_test_end` turns them into ``self.summary`` (mean and std of every column named in
  ``test_metrics``) and ``<test_name>_results.csv``, and :meth:`fit_and_test` trains, tests every
  ``test*`` set and writes ``test_summary.json`` with the training time, epochs and sizes;
* ``use_tensorboard: True`` writes TensorBoard scalars to ``tensorboard_folder`` (default
  ``<output_folder>/tensorboard``): the training loss every ``tensorboard_interval`` updates, and
  every epoch's train/valid statistics and learning rate;
* :class:`SafeCheckpointer` (the ``checkpointer`` of our yamls) never offers a half-written
  checkpoint for recovery;
* under ``torchrun`` (DDP), stopping decisions (time budget) are taken by all processes together,
  so no process waits forever for one that has stopped.

A subclass implements ``compute_forward``, ``compute_objectives`` and may collect metrics in
``self.stage_metrics`` (a dict of running sums) during VALID/TEST.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time

import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.checkpoints import (Checkpointer, mark_as_loader, mark_as_saver,
                                           register_checkpoint_hooks)
from speechbrain.utils.epoch_loop import EpochCounter
from safetensors.torch import load_file as load_safetensors

from modules.training.memory import compact_memory_requested, restart_with_compact_memory, reuse_freed_memory

logger = logging.getLogger(__name__)


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true in any process of a DDP run (just ``flag`` without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


class SafeCheckpointer(Checkpointer):
    """A SpeechBrain ``Checkpointer`` whose checkpoints count only once completely written.

    SpeechBrain writes ``CKPT.yaml`` first and then each object's file, so a run killed during a
    save leaves a folder that recovery takes for a checkpoint and then fails to load (a missing
    or truncated ``.ckpt``). Here an ``INCOMPLETE`` marker is created before ``CKPT.yaml`` and
    removed after the last file; marked folders are ignored, and deleted when recovering.
    """

    MARKER = "INCOMPLETE"

    def _save_checkpoint_metafile(self, fpath, meta, end_of_epoch):
        open(os.path.join(os.path.dirname(fpath), self.MARKER), "w").close()
        return super()._save_checkpoint_metafile(fpath, meta, end_of_epoch)

    def save_checkpoint(self, *args, **kwargs):
        ckpt = super().save_checkpoint(*args, **kwargs)
        if ckpt is not None:  # the main process, once every file is written
            os.remove(os.path.join(ckpt.path, self.MARKER))
        # Under DDP every process then lists the checkpoints to delete, and their lists must
        # agree (one broadcast per deletion): none may list while the new one is still marked.
        sb.utils.distributed.ddp_barrier()
        return ckpt

    def _incomplete(self, path) -> bool:
        return os.path.exists(os.path.join(path, self.MARKER))

    def _list_checkpoint_dirs(self):
        return [d for d in super()._list_checkpoint_dirs() if not self._incomplete(d)]

    def recover_if_possible(self, *args, **kwargs):
        if sb.utils.distributed.if_main_process() and self.checkpoints_dir.exists():
            for d in self.checkpoints_dir.iterdir():
                if d.is_dir() and self._incomplete(d):
                    logger.warning("removing %s: a checkpoint whose writing was interrupted", d)
                    shutil.rmtree(d)
        sb.utils.distributed.ddp_barrier()
        return super().recover_if_possible(*args, **kwargs)


def is_safetensors(path) -> bool:
    """Whether ``path`` is a safetensors file: an 8-byte little-endian header length, then a JSON
    header that opens with ``{`` and fits in the file. (Its first byte can be anything, so a
    test on torch's magic bytes alone mistakes some safetensors files for pickles.)"""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + length <= size


def load_weights(module: torch.nn.Module, path, strict: bool = True):
    """Load a state dict into ``module`` from a safetensors file or a PyTorch file (read with
    ``weights_only=True``; nothing in it is executed). ``strict=False`` is a warm start: only
    the entries whose name and shape ``module`` has are loaded (e.g. the TasNet encoder, mask
    network and decoder of a separation model into an extraction model); it fails when none fit.
    Returns the names loaded."""
    if is_safetensors(path):
        state = load_safetensors(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if strict:
        module.load_state_dict(state, strict=True)
        return sorted(state)
    own = module.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ValueError(f"no entry of {path} fits the model (names and shapes differ everywhere)")
    module.load_state_dict(fitting, strict=False)
    logger.info("warm start from %s: %d of the model's %d entries loaded, %d of the file's left out",
                path, len(fitting), len(own), len(state) - len(fitting))
    return sorted(fitting)


def weights_file(source: str, metric: str = "si-snr", mode: str = "max") -> str:
    """The model weights that ``source`` names: a weights file, an exported model folder
    (``model.safetensors`` or ``model.ckpt``), a checkpoint folder (``CKPT+*``), or a training
    output folder (its best complete checkpoint by ``metric``)."""
    if os.path.isfile(source):
        return source
    for name in ("model.safetensors", "model.ckpt"):
        if os.path.isfile(os.path.join(source, name)):
            return os.path.join(source, name)
    if os.path.isdir(os.path.join(source, "save")):
        return os.path.join(best_checkpoint(os.path.join(source, "save"), metric, mode), "model.ckpt")
    raise FileNotFoundError(f"init_from={source!r} names no weights: give a weights file, an "
                            "exported model folder, a checkpoint folder or a training output folder")


def best_checkpoint(save_folder: str, metric: str = "si-snr", mode: str = "max") -> str:
    """Folder of the best complete checkpoint in ``save_folder`` by ``metric`` (``mode``: max or
    min), as recovery finds it: checkpoints whose writing was interrupted are never chosen."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    ckpt = None
    if os.path.isdir(save_folder):
        ckpt = SafeCheckpointer(save_folder).find_checkpoint(**{f"{mode}_key": metric})
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint with a '{metric}' value in {save_folder}; "
                                "train first (recipes/<task>/train.py) or check the folder")
    return str(ckpt.path)


@register_checkpoint_hooks
class BudgetedEpochCounter(EpochCounter):
    """Epoch counter that also stops once ``max_minutes`` of wall time have been spent,
    validation included.

    :class:`BaseBrain` also checks it before every training batch: training stops while there is
    still time for the validation pass that follows (:attr:`reserve_seconds`, the duration of the
    last validation pass, or an estimate before the first), then that epoch is validated and
    checkpointed, and training ends. The time spent is saved in checkpoints: a resumed run
    continues the same budget (time between the interruption and the restart does not count).
    ``max_minutes <= 0`` means no time limit.
    """

    def __init__(self, limit: int, max_minutes: float = 0):
        super().__init__(limit)
        self.max_minutes = float(max_minutes or 0)
        self.elapsed = 0.0
        self.reserve_seconds = 0.0
        self.clock = time.monotonic
        self._last = None

    def _tick(self):
        now = self.clock()
        if self._last is not None:
            self.elapsed += now - self._last
        self._last = now

    @property
    def budget_exhausted(self) -> bool:
        """True once the time spent plus :attr:`reserve_seconds` reaches the budget."""
        self._tick()
        return self.max_minutes > 0 and self.elapsed + self.reserve_seconds >= 60 * self.max_minutes

    def __next__(self):
        self.reserve_seconds = 0.0  # between epochs nothing more has to fit
        if any_process(self.budget_exhausted):
            logger.info("time budget of %.1f min spent (%.1f min): stopping training",
                        self.max_minutes, self.elapsed / 60)
            raise StopIteration
        return super().__next__()

    def fraction_spent(self, epoch: int) -> float:
        """Share of the training spent after ``epoch``: of the time budget when there is one,
        else of the epoch limit."""
        if self.max_minutes > 0:
            self._tick()
            return min(1.0, self.elapsed / (60 * self.max_minutes))
        return min(1.0, epoch / max(self.limit, 1))

    @mark_as_saver
    def _save(self, path):
        self._tick()
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"current": self.current, "elapsed": self.elapsed}, f)

    @mark_as_loader
    def _recover(self, path, end_of_epoch=True):
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        self.current = state["current"] if end_of_epoch else state["current"] - 1
        self.elapsed = state["elapsed"]
        self._last = None


@register_checkpoint_hooks
class BudgetedAnnealing:
    """Learning rate for a training budget: ``lr`` for the first ``hold`` of it, then down a half
    cosine to ``lr_min`` at its end. The budget is the epoch counter's: its ``max_minutes`` when
    set (share of the time spent), else its epoch limit. Called after each validation pass as
    SpeechBrain's epoch schedulers are, ``scheduler(optimizers, epoch, value) -> (lr, next_lr)``
    (``value`` unused). It holds no state: the rate follows from the counter's time, which the
    counter checkpoints (its checkpoint hooks only let it sit among the yaml's recoverables)."""

    def __init__(self, lr: float, counter: BudgetedEpochCounter, lr_min: float = 0.0, hold: float = 0.25):
        if not 0 <= hold < 1:
            raise ValueError(f"hold is the share of the budget at the full rate, in [0, 1); got {hold}")
        if not 0 <= lr_min <= lr:
            raise ValueError(f"need 0 <= lr_min <= lr, got lr_min={lr_min}, lr={lr}")
        self.lr, self.lr_min, self.hold, self.counter = float(lr), float(lr_min), float(hold), counter

    def rate(self, fraction: float) -> float:
        """The learning rate once ``fraction`` of the budget is spent."""
        t = min(1.0, max(0.0, (fraction - self.hold) / (1 - self.hold)))
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * t))

    def __call__(self, optimizers, epoch, value=None):
        return optimizers[0].param_groups[0]["lr"], self.rate(self.counter.fraction_spent(epoch))

    @mark_as_saver
    def _save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({}, f)

    @mark_as_loader
    def _recover(self, path, end_of_epoch=True):
        pass


LR_SCHEDULES = ("plateau", "anneal")


def make_lr_scheduler(kind: str, lr: float, counter: BudgetedEpochCounter, lr_min=None,
                      factor: float = 0.5, patience: int = 2, dont_halve_until_epoch: int = 3,
                      hold: float = 0.25):
    """The yaml's ``lr_scheduler`` for ``lr_schedule: kind``: ``plateau`` (SpeechBrain's
    ``ReduceLROnPlateau``: multiply by ``factor`` when the valid metric has not improved for
    ``patience`` epochs, down to ``lr_min``) or ``anneal`` (:class:`BudgetedAnnealing` from
    ``lr`` to ``lr_min``, default 0, after ``hold`` of the budget)."""
    if kind == "plateau":
        kw = {} if lr_min is None else {"lr_min": lr_min}
        return sb.nnet.schedulers.ReduceLROnPlateau(factor=factor, patience=patience,
                                                    dont_halve_until_epoch=dont_halve_until_epoch, **kw)
    if kind == "anneal":
        return BudgetedAnnealing(lr, counter, lr_min=lr_min or 0.0, hold=hold)
    raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {kind!r}")


class BaseBrain(sb.Brain):
    """Brain base for every recipe (see the module docstring)."""

    #: columns of ``test_rows`` that are metrics (averaged into the summary), and the ones before them
    test_metrics: tuple = ()
    test_keys: tuple = ("snt_id",)
    #: the summary's name for the number of test examples
    count_name = "n_mixtures"
    test_name = "test"

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        # Items are dicts of tensors of different lengths: pad them into a PaddedBatch.
        loader_kwargs.setdefault("collate_fn", PaddedBatch)
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def fit(self, epoch_counter, train_set, valid_set=None, **kwargs):
        self._train_dataset = train_set
        self._valid_set = valid_set
        self._valid_batch_size = (kwargs.get("valid_loader_kwargs") or {}).get("batch_size", 1)
        return super().fit(epoch_counter, train_set, valid_set, **kwargs)

    #: before the first validation pass, its duration is estimated as this many training steps
    #: per validation batch (a forward pass on one longer mixture against a training step on a
    #: batch of crops)
    FIRST_VALID_STEPS_PER_BATCH = 0.5

    @property
    def _optimizer_step_limit_exceeded(self):
        # speechbrain checks this before every training batch and after every epoch
        counter = getattr(self.hparams, "epoch_counter", None)
        if isinstance(counter, BudgetedEpochCounter) and counter.max_minutes > 0:
            counter.reserve_seconds = self._expected_valid_seconds(counter)
            if any_process(counter.budget_exhausted):
                return True
        return sb.Brain._optimizer_step_limit_exceeded.fget(self)

    def _expected_valid_seconds(self, counter) -> float:
        if getattr(self, "_valid_seconds", None) is not None:
            return self._valid_seconds
        steps = getattr(self, "step", 0)
        start = getattr(self, "_train_start", None)
        n_valid = len(self._valid_set) if getattr(self, "_valid_set", None) is not None else 0
        if not steps or start is None or not n_valid:
            return 0.0
        per_step = (counter.clock() - start) / steps
        batch = getattr(self, "_valid_batch_size", 1)
        return per_step * self.FIRST_VALID_STEPS_PER_BATCH * -(-n_valid // batch)

    def on_fit_start(self):
        super().on_fit_start()
        self.tensorboard = None
        if getattr(self.hparams, "use_tensorboard", False) and sb.utils.distributed.if_main_process():
            from torch.utils.tensorboard import SummaryWriter

            folder = getattr(self.hparams, "tensorboard_folder", None) or os.path.join(
                self.hparams.output_folder, "tensorboard")
            self.tensorboard = SummaryWriter(folder)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        every = getattr(self.hparams, "tensorboard_interval", 10)
        if getattr(self, "tensorboard", None) and should_step and self.optimizer_step % every == 0:
            self.tensorboard.add_scalar("train/loss_step", float(loss), self.optimizer_step)

    def _log_tensorboard(self, prefix, stats, epoch):
        if getattr(self, "tensorboard", None) is None:
            return
        for name, value in stats.items():
            self.tensorboard.add_scalar(f"{prefix}/{name}", value, epoch)
        self.tensorboard.flush()

    def on_stage_start(self, stage, epoch=None):
        self.stage_metrics = {}
        self.stage_count = 0
        self.test_rows = []
        counter = getattr(self.hparams, "epoch_counter", None)
        clock = getattr(counter, "clock", time.monotonic)
        if stage == sb.Stage.TRAIN:
            self._train_start = clock()
            if isinstance(counter, BudgetedEpochCounter) and counter.max_minutes > 0:
                logger.info("epoch %s: %.1f of %.1f budget minutes left; the epoch stops when they "
                            "run out (the progress bar's estimate is for the whole epoch)", epoch,
                            counter.max_minutes - counter.elapsed / 60, counter.max_minutes)
        elif stage == sb.Stage.VALID:
            self._valid_start = clock()
        if stage == sb.Stage.TRAIN and hasattr(getattr(self, "_train_dataset", None), "set_epoch"):
            self._train_dataset.set_epoch(epoch)

    def accumulate(self, metrics: dict, n: int = 1):
        """Add per-utterance metric sums (``metrics`` holds sums over ``n`` utterances)."""
        for k, v in metrics.items():
            self.stage_metrics[k] = self.stage_metrics.get(k, 0.0) + float(v)
        self.stage_count += n

    def stage_stats(self, stage_loss) -> dict:
        stats = {"loss": float(stage_loss)}
        if self.stage_count:
            stats.update({k: v / self.stage_count for k, v in self.stage_metrics.items()})
        return stats

    def check_loss_isfinite(self, loss):
        if not torch.isfinite(loss):
            ids = getattr(self, "_batch_ids", None)
            logger.warning("non-finite loss (%s) on batch %s: its update is skipped", float(loss), ids)
        super().check_loss_isfinite(loss)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = self.stage_stats(stage_loss)
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            self._log_tensorboard("train", stats, epoch)
            return
        if stage == sb.Stage.VALID:
            counter = getattr(self.hparams, "epoch_counter", None)
            self._valid_seconds = getattr(counter, "clock", time.monotonic)() - self._valid_start
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
            metric = self.hparams.valid_metric
            meta = {"epoch": epoch, "lr": lr}
            if hasattr(self.hparams, "lr_scheduler"):
                # The scheduler minimises: give it a loss-like value. It only returns the next
                # rate; setting it on the optimizer is ours to do.
                value = stats[metric] if self.hparams.valid_metric_mode == "min" else -stats[metric]
                _, next_lr = self.hparams.lr_scheduler([self.optimizer], epoch, value)
                sb.nnet.schedulers.update_learning_rate(self.optimizer, next_lr)
                meta["next_lr"] = next_lr
            self._log_tensorboard("valid", {**stats, "lr": lr}, epoch)
            if hasattr(self.hparams, "train_logger"):
                self.hparams.train_logger.log_stats(
                    stats_meta=meta,
                    train_stats=getattr(self, "train_stats", None), valid_stats=stats)
            if self.checkpointer is not None:
                keys = {f"{self.hparams.valid_metric_mode}_keys": [metric]}
                self.checkpointer.save_and_keep_only(
                    meta={metric: stats[metric], "epoch": epoch},
                    num_to_keep=getattr(self.hparams, "checkpoints_to_keep", 1), **keys)
        if stage == sb.Stage.TEST:
            if hasattr(self.hparams, "train_logger"):
                self.hparams.train_logger.log_stats(
                    stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                    test_stats=stats)
            self.on_test_end(stats)

    def on_test_end(self, stats: dict):
        """Summarise ``test_rows`` into ``self.summary`` and write ``<test_name>_results.csv``."""
        import csv

        rows, n = self.test_rows, len(self.test_rows)
        summary = {self.count_name: n}
        if hasattr(self.hparams, "data_folder"):
            summary["data_folder"] = self.hparams.data_folder
        for k in self.test_metrics:
            vals = torch.tensor([r[k] for r in rows], dtype=torch.float64)
            summary[k] = float(vals.mean()) if n else float("nan")
            summary[k + "_std"] = float(vals.std()) if n > 1 else 0.0
        self.summary = self.finish_summary(summary)
        if sb.utils.distributed.if_main_process():
            path = os.path.join(self.hparams.output_folder, f"{self.test_name}_results.csv")
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=[*self.test_keys, *self.test_metrics])
                w.writeheader()
                w.writerows(rows)

    def finish_summary(self, summary: dict) -> dict:
        """Hook: adjust the test summary (e.g. rename a metric, add facts about the test set)."""
        return summary

    def fit_and_test(self, hparams: dict, sets: dict) -> dict:
        """Train on ``sets["train"]`` (validating on ``sets["valid"]``), then test the best
        checkpoint on every ``test*`` set (with ``test_split: valid`` in the hparams, on the
        validation set instead, e.g. to choose an inference setting on speakers the test set does
        not hold). Returns the summary, also written to
        ``test_summary.json``: the test metrics (one dict per test set when there are several),
        ``params_M``, ``trained_params_M``, ``train_minutes``, ``epochs`` and ``best_epoch``."""
        split = hparams.get("test_split", "test")
        if split not in ("test", "valid"):  # refused before training, not after it
            raise ValueError(f"test_split must be 'test' or 'valid', got {split!r}")
        counter, model = hparams["epoch_counter"], hparams["model"]
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("%.3f M parameters, %.3f M of them trained", total / 1e6, trained / 1e6)
        self.fit(counter, sets["train"], sets["valid"], train_loader_kwargs=hparams["dataloader_opts"],
                 valid_loader_kwargs=hparams["eval_dataloader_opts"])
        # read before testing reloads the best checkpoint (and with it that epoch's counter)
        results = {"params_M": total / 1e6,
                   "trained_params_M": trained / 1e6,
                   "train_minutes": counter.elapsed / 60, "epochs": counter.current}
        key = {f"{hparams['valid_metric_mode']}_key": hparams["valid_metric"]}
        names = sorted(k for k in sets if k.startswith("test"))
        if split == "valid":  # e.g. choose an inference setting on the validation speakers
            sets, names = {**sets, "test": sets["valid"]}, ["test"]
        for name in names:
            self.test_name = name
            self.evaluate(sets[name], test_loader_kwargs=hparams["eval_dataloader_opts"], **key)
            results[name] = self.summary
        results["best_epoch"] = counter.current
        if names == ["test"]:
            results = {**results.pop("test"), **results, "test_split": split}
        if sb.utils.distributed.if_main_process():
            with open(os.path.join(hparams["output_folder"], "test_summary.json"), "w") as f:
                json.dump(results, f, indent=2)
        return results


def setup_recipe(brain_class, argv=None):
    """What every recipe's ``run`` starts with: parse the command line, join the DDP group under
    torchrun, load the yaml with its overrides, create the output folder, build the datasets
    (the main process first, so corpora and caches are made once) and the Brain.

    Returns ``(brain, hparams, datasets)``; the yaml must define ``data`` (with ``datasets()``),
    ``modules``, ``optimizer`` and ``checkpointer``.
    """
    import sys

    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.utils.distributed import ddp_init_group, run_on_main

    hparams_file, run_opts, overrides = sb.parse_arguments(argv if argv is not None else sys.argv[1:])
    if compact_memory_requested(hparams_file, overrides):
        restart_with_compact_memory(argv)
    ddp_init_group(run_opts)  # under torchrun: join the process group (gloo on CPU, nccl on GPUs)
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    if run_opts.get("compile"):
        # measured on Conv-TasNet-small, torch 2.9.1: the compiled bf16 step's gradients differ
        # from the eager ones by 100 % (fp32: 2e-5), see docs/BENCHMARKS.md
        if (run_opts.get("precision") or hparams.get("precision")) == "bf16":
            raise ValueError("--compile together with bf16 precision gives wrong gradients for our "
                             "models' written-out backward passes; train with --compile in fp32, or "
                             "in bf16 without --compile")
        logger.warning("--compile: in our timed recipe runs the first epoch did not learn (training "
                       "SI-SNR stayed near its initial value; learning started in epoch 2), cause not "
                       "found yet; see docs/BENCHMARKS.md before relying on it")
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=overrides)
    if hparams.get("init_from"):  # fine-tuning: start from other weights (a resume still wins)
        path = weights_file(str(hparams["init_from"]), hparams.get("valid_metric", "si-snr"),
                            hparams.get("valid_metric_mode", "max"))
        load_weights(hparams["model"], path, strict=bool(hparams.get("init_strict", True)))
        logger.info("model initialised from %s", path)
    run_on_main(hparams["data"].datasets)
    sets = hparams["data"].datasets()
    brain = brain_class(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams,
                        run_opts=run_opts, checkpointer=hparams["checkpointer"])
    n_params = sum(p.numel() for p in hparams["model"].parameters())
    logger.info("model: %s, %.3f M parameters", type(hparams["model"]).__name__, n_params / 1e6)
    return brain, hparams, sets


def train_and_test(brain_class, argv=None, report=None) -> dict:
    """A recipe's whole run: :func:`setup_recipe`, :meth:`BaseBrain.fit_and_test`, then
    ``report(hparams, summary)`` on the main process. Returns the summary."""
    brain, hparams, sets = setup_recipe(brain_class, argv)
    # freed activations are reused instead of faulted in afresh (faster steps, docs/BENCHMARKS.md);
    # compact_memory runs keep their own lower-peak allocator
    reuse = bool(hparams.get("train_reuse_freed_memory", True)) and not hparams.get("compact_memory", False)
    with reuse_freed_memory(reuse):
        summary = brain.fit_and_test(hparams, sets)
    if report is not None and sb.utils.distributed.if_main_process():
        report(hparams, summary)
    return summary
