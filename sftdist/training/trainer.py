"""The one training loop. ``with Trainer(cfg) as trainer: trainer.fit()``: set up (resuming where a checkpoint is),
then per step: set the LR, the step's grad sum, clip and step, maybe eval, log, maybe checkpoint or stop; then export.

Whatever the strategy, a step is: the step's samples (chosen by seed and step alone) -> this rank's micro-batches
(StepFeeder) -> for each, forward and backward of (CE sum / supervised tokens of the whole step) -> clip -> step
(ModelRunner). The loop asks each component whether it is due (Evaluator, Checkpointer, StopPolicy).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from sftdist.config import SFTConfig
from sftdist.curriculum.difficulty import build_sampler
from sftdist.curriculum.model_loss import cached_model_loss, score_model_loss
from sftdist.data.dataset import build_datasets
from sftdist.errors import ConfigError
from sftdist.metrics import build_metrics_logger, check_wandb
from sftdist.metrics.flops import peak_tflops
from sftdist.model import build_tokenizer, pad_token_id
from sftdist.model.lora import check_qlora
from sftdist.parallel import build_strategy, check_world_size
from sftdist.run.checkpoint import checkpoints_dir, load_checkpoint, problem, read_curriculum, step_dir
from sftdist.run.identity import continued_wandb_run, find_checkpoint, run_identity
from sftdist.run.layout import FINAL_DIR
from sftdist.run.lock import RunLock
from sftdist.run.signals import StopPolicy, StopSignals
from sftdist.run.storage import size_of
from sftdist.training.best import BestCheckpoint
from sftdist.training.checkpointer import Checkpointer
from sftdist.training.evaluation import Evaluator, build_eval_sources, build_probes
from sftdist.training.feed import StepFeeder
from sftdist.training.hf import HFWriter
from sftdist.training.nonfinite import NonFiniteSteps, sample_names
from sftdist.training.optim import epoch_steps, lr_at, set_lr
from sftdist.training.outputs import prepare_output_dir
from sftdist.training.runner import build_runner
from sftdist.training.steplog import StepLog, log_plan
from sftdist.validation import check_stop_after_step

log = logging.getLogger(__name__)


class Trainer:
    """One run: ``Trainer(cfg)`` sets it up (resuming from a checkpoint where there is one), ``fit()`` trains it,
    ``close()`` releases what it holds, also after a failure: use it as a context manager.

    What tests and benchmarks may replace on an instance: ``runner.train_step`` (one step's micro-batches -> its
    stats) and ``feed.steps`` (start, stop -> (step, samples, micro-batches)) and ``sampler.indices``."""

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.metrics = None
        self._closed = self._fitted = False
        check_wandb(cfg.wandb)
        # Stop signals are caught from here to close(): one during the set-up (a preemption while the data is
        # prepared, say) stops the run before its first step, rather than killing it
        self.stop_signals = StopSignals(cfg.checkpoint.stop_timeout_s).__enter__()
        try:
            self.strategy = build_strategy(cfg)
            self._set_up()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set_up(self) -> None:
        cfg, strategy = self.cfg, self.strategy
        self.device = strategy.device
        self.output_dir = Path(cfg.output_dir)
        self.lock = RunLock(self.output_dir, held=strategy.is_main)  # one run per output_dir
        with strategy.main_first("the output directory"):
            self.lock.check()
        check_world_size(cfg, strategy.world_size)
        check_qlora(cfg.model.lora, cfg.model.name_or_path, cfg.strategy.name, self.device)
        torch.manual_seed(cfg.seed)

        # Data: rank 0 prepares (and caches) it; the others then read the cache
        self.tokenizer, self.chat_template = build_tokenizer(cfg.model, cfg.data)
        self.pad_id = pad_token_id(self.tokenizer)
        with strategy.main_first("the data"):
            self.train_set, self.eval_set, self.data_report = build_datasets(
                cfg.data, cfg.eval, self.tokenizer, self.chat_template, cfg.seed
            )
            eval_sources, reports = (
                build_eval_sources(cfg, self.tokenizer, self.chat_template) if cfg.eval.every_steps else ({}, {})
            )
        if reports:
            self.data_report.eval_sources = {name: report.to_json() for name, report in reports.items()}
        if cfg.train.global_batch_size > len(self.train_set):
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} is larger than the "
                f"{len(self.train_set)} training records: every step would repeat samples"
            )
        if cfg.train.epochs is not None:  # the run's length, now that the training set is known
            cfg.train.max_steps = epoch_steps(cfg.train, len(self.train_set))
            check_stop_after_step(cfg.train)
        self.identity = run_identity(cfg, self.data_report)
        self.resume_from, resumed = find_checkpoint(cfg, self.output_dir, self.identity, strategy)

        # The model: fsdp2 and zero3 never build it whole on a rank (their setup loads the weights)
        self.runner = build_runner(cfg, strategy, self.tokenizer, self.pad_id)
        self.model, self.optimizer = self.runner.model, self.runner.optimizer
        self.runner.choose_loss_impl(self.train_set[0])

        # What each step draws: before the checkpoint's weights load (a curriculum's model_loss is the base's)
        saved = read_curriculum(self.resume_from, resumed) if cfg.curriculum.name != "none" else None
        plan = build_sampler(cfg, self.train_set, self.eval_set, self._model_losses, saved)
        self.sampler, self.train_set = plan.sampler, plan.train_set
        if plan.report is not None:
            self.data_report.curriculum = plan.report
            for warning in plan.report["warnings"] if strategy.is_main else []:
                log.warning("%s", warning)
        self.feed = StepFeeder(self.train_set, self.sampler, cfg, self.pad_id, strategy, self.runner.dims.flops)
        probes = build_probes(cfg, self.eval_set, self.tokenizer) if cfg.eval.every_steps else []
        self.evaluator = Evaluator(
            cfg, self.eval_set, plan.eval_buckets, eval_sources, probes, self.tokenizer, self.chat_template
        )
        self.start_step = 0
        if self.resume_from is not None:
            load_checkpoint(self.resume_from, strategy, self.model, self.optimizer)
            self.start_step = resumed.step
        self.weights_step = self.start_step  # the step whose weights the model holds

        # The run's outputs, once the inputs proved good (a failed start leaves no trace), under the run's lock
        with strategy.main_first("the output directory"):
            self.lock.acquire()
            if strategy.is_main:
                prepare_output_dir(cfg, self.data_report, resumed=self.resume_from is not None)
        wandb_run_id = continued_wandb_run(self.resume_from, resumed, self.output_dir) or uuid.uuid4().hex[:12]
        self.metrics = build_metrics_logger(
            cfg.wandb, self.output_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), strategy.is_main,
            run_id=wandb_run_id, resume_step=self.start_step if self.resume_from is not None else None,
        )  # fmt: skip
        self.hf = HFWriter(cfg, strategy, self.model, self.tokenizer, self.data_report)
        expected_size = (  # a checkpoint's bytes: the one resumed from, else trained fp32 weights and AdamW's moments
            size_of(self.resume_from) if self.resume_from is not None else 12 * self.runner.num_trained
        )
        saved = resumed if self.resume_from is not None else None  # (the counts a resumed run goes on from)
        self.nonfinite = NonFiniteSteps(
            cfg.train.skip_nonfinite_steps, *((saved.skipped_steps, saved.nonfinite_in_a_row) if saved else ())
        )
        self.best = BestCheckpoint(
            cfg, *((saved.best_step, saved.best_value, saved.evals_since_best, saved.best_of) if saved else ())
        )
        self.checkpointer = Checkpointer(
            cfg, strategy, self.hf, self.identity, wandb_run_id, plan.report, plan.row_buckets, self.metrics,
            expected_size, self.nonfinite, self.best,
        )  # fmt: skip
        self.stops = StopPolicy(self.stop_signals, strategy.all_sum, cfg.train.stop_after_step, cfg.train.max_steps)
        peak = peak_tflops(self.device, cfg.train.peak_tflops)
        self.steplog = StepLog(
            cfg, self.metrics, strategy, self.sampler, self.runner.dims, peak, self.runner.loss_impl,
            self.train_set.source_names() if len(self.data_report.sources) > 1 else None,
        )  # fmt: skip
        if strategy.is_main:
            log_plan(
                cfg, self.data_report, world_size=strategy.world_size, device=self.device, runner=self.runner,
                sampler=self.sampler, resume_from=self.resume_from, start_step=self.start_step,
            )  # fmt: skip

    def _model_losses(self) -> np.ndarray:
        """The base model's loss of every prepared sample (cached), scored in rows of data.max_length tokens at
        most (packed attention costs the square of a row's length)."""
        self.model.eval()
        score = lambda: score_model_loss(  # noqa: E731
            self.train_set.table, self.runner.logits, self.cfg.data.max_length, self.pad_id, self.strategy, self.device
        )
        return cached_model_loss(self.cfg, self.data_report.fingerprint, score, self.strategy.is_main)

    def fit(self) -> dict[str, Any]:
        """Train from ``start_step`` to ``train.max_steps`` (or an early stop), checkpointing on the way, then export
        ``final/``; return the last step's metrics. A stop signal ends it at a step boundary, after a checkpoint,
        with ``stopped_by`` (the signal's name) in the result."""
        t = self.cfg.train
        start, metrics = time.perf_counter(), {}
        with self.steplog.progress(self.start_step):
            if self.stops.share_done(self.start_step):  # a requeue of a job that had already reached it
                return self._end_share(self.start_step, metrics)
            if self.stops.signalled():  # a signal came during the set-up: stop before the first step
                return self._end_signalled(self.start_step, metrics)
            if self.evaluator.due_before_training(self.start_step):
                baseline = self.evaluate(0)
                self.best.update(0, baseline)  # (no best yet; a keep_best the evals do not log is named now)
                self.steplog.write(-1, baseline)  # the baseline, logged as step 0
            end = self.start_step if self.best.stop_early else t.max_steps  # (a run that stopped early, started again)
            for step, samples, micro_batches in self.feed.steps(self.start_step, end):
                # The grad sum of the step's token mean over all ranks, clipped, then the optimizer's step
                lr = lr_at(step, t)
                set_lr(self.optimizer, lr)
                step_start = time.perf_counter()
                stats = self.runner.train_step(micro_batches)  # (not applied when not finite: all ranks alike)
                names = functools.partial(self._sample_names, step)  # (read only for a step left out)
                self.nonfinite.applied(step, stats, lr, names, self.strategy.is_main)
                metrics = self.steplog.metrics(
                    step, lr, stats, samples, micro_batches, time.perf_counter() - step_start
                )
                metrics["train/skipped_steps"] = self.nonfinite.skipped
                done, best_now = step + 1, False
                if self.evaluator.due(done):
                    metrics.update(self.evaluate(done))
                    best_now = self.best.update(done, metrics)
                    metrics.update(self.best.said())
                self.steplog.write(step, metrics)
                # Every rank stops at the same step boundary, after a checkpoint
                signalled, share_done = self.stops.signalled(), self.stops.share_done(done)
                diverged = self.nonfinite.too_many  # never trained on, or exported: stopped with a checkpoint
                stop_early = self.best.stop_early and done < t.max_steps
                checkpoint, self.weights_step = None, done
                if self.checkpointer.due(done, stopping=signalled or share_done or diverged or best_now or stop_early):
                    checkpoint = self.checkpointer.save(done, self.model, self.optimizer)
                if diverged:
                    raise self.nonfinite.error(step, checkpoint)
                if share_done:  # also when a signal came in this step: the job's work is done, not cut short
                    return self._end_share(done, metrics)
                if signalled and done < t.max_steps:  # at the last step, the export is what is left to do
                    return self._end_signalled(done, metrics)
                if stop_early:
                    self.best.log_stop(done)
                    break
        wall = time.perf_counter() - start
        self.steplog.done(self.start_step, self.weights_step, wall, self._export())
        self.strategy.barrier()
        self._fitted = True
        return {**metrics, "wall_s": wall}

    def _export(self) -> Path:
        """final/: of the weights the run ends with, or with checkpoint.export_best of the best checkpoint."""
        step = self.weights_step
        if self.cfg.checkpoint.export_best and self.best.step is not None and self.best.step != step:
            best = step_dir(checkpoints_dir(self.output_dir), self.best.step)
            if problem(best) is None:
                step = self.best.step
                load_checkpoint(best, self.strategy, self.model, self.optimizer)
            elif self.strategy.is_main:  # (a resume from an older checkpoint, whose best was pruned since)
                log.warning("checkpoint.export_best: %s is gone (%s); exporting step %d", best, problem(best), step)
        return self.hf.export(self.output_dir / FINAL_DIR, self.output_dir, step)

    def _sample_names(self, step: int) -> list[str]:
        return sample_names(self.train_set, self.sampler.indices(step))

    def _end_share(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        self._fitted = True
        return {**metrics, **self.stops.end_share(step, self.strategy.is_main)}

    def _end_signalled(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """(before the first step, the checkpoint is the one resumed from, if any)"""
        checkpoint = step_dir(checkpoints_dir(self.output_dir), step) if step > self.start_step else self.resume_from
        self._fitted = True
        return {**metrics, **self.stops.end_signalled(step, checkpoint, self.output_dir, self.strategy.is_main)}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """The eval metrics after ``step`` steps; the probes' answers go to probes.jsonl and W&B."""
        metrics = self.evaluator.losses(self._loss_sums, self.strategy.all_sum)
        probed, rows = self.evaluator.probe(
            self.strategy.unwrap(self.model), self.strategy, self.hf.probe_stop_ids, self.pad_id, self.device,
            self.runner.autocast,
        )  # fmt: skip
        self.metrics.log_probes(rows, step)
        return {**metrics, **probed}

    def _loss_sums(self, samples: list) -> tuple[float, int]:
        """(summed cross-entropy, supervised tokens) of these samples on this rank (its share of them)."""
        return self.runner.loss_sums(self.feed.eval_batches(samples))

    def close(self) -> None:
        """Release what the run holds, whether it finished or failed: the metrics file, W&B, the process group.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.metrics is not None:
            self.metrics.close()
        try:
            if self._fitted:  # every rank leaves once rank 0's files are closed: a launcher that ends the others
                self.strategy.barrier()  # when the first exits (srun --kill-on-bad-exit, after a stop) cuts nothing
        finally:
            if hasattr(self, "strategy"):
                self.strategy.close()
            if hasattr(self, "lock"):
                self.lock.release()
            self.stop_signals.__exit__(None, None, None)
