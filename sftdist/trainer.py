"""The one training loop. Reads top to bottom: set up (resuming where a checkpoint is), then per step: set LR,
micro-steps, clip, step, maybe eval, log, maybe checkpoint or stop; then export.

Whatever the strategy, a step is: the step's samples (chosen by seed and step alone) -> micro-batches ->
for each, forward and backward of (CE sum / supervised tokens in the whole step) -> clip -> step.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from sftdist import __version__
from sftdist.checkpoint import (
    CURRICULUM_FILE,
    HF_DIR,
    checkpoints_dir,
    load_checkpoint,
    save_checkpoint,
    step_dir,
)
from sftdist.config import SFTConfig, TrainConfig
from sftdist.data.batching import MicroBatch, StepSampler, build_micro_batches
from sftdist.data.curriculum import BUCKETS, CurriculumSampler
from sftdist.data.difficulty import build_curriculum
from sftdist.data.pipeline import Sample, build_datasets
from sftdist.errors import ConfigError, DataError
from sftdist.evaluation import Evaluator, build_eval_sources, build_probes
from sftdist.export import export_hf, export_lora, stop_token_ids, write_hf_meta
from sftdist.loss import cross_entropy_sum, install_loss_head, loss_impl, step_normalised_loss, supervised_targets
from sftdist.metrics import MetricsLogger, build_metrics_logger, check_wandb
from sftdist.metrics.flops import ModelDims, peak_tflops
from sftdist.model import (
    base_model_weights,
    build_model,
    build_tokenizer,
    checkpoint_dtype,
    max_positions,
    model_weights,
    num_parameters,
    pad_token_id,
)
from sftdist.model.attention import apply_packed_attention, packed_attention_kwargs, resolve_backend
from sftdist.model.lora import check_qlora
from sftdist.parallel import build_strategy, check_world_size
from sftdist.resume import find_checkpoint, flat_config, run_identity
from sftdist.scoring import cached_model_loss, score_model_loss
from sftdist.signals import STOPPED_FILE, StopSignals, record_stop

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based step ``step``: linear warm-up, then cosine down to lr * min_lr_ratio."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)  # the peak comes once, right after warm-up
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = (step - warmup) / max(1, cfg.max_steps - 1 - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - min_lr)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


class Trainer:
    """One run: ``Trainer(cfg)`` sets it up (resuming from a checkpoint where there is one), ``fit()`` trains it,
    ``close()`` releases what it holds (call it from a ``finally``: it also runs after a failure)."""

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.metrics: MetricsLogger | None = None
        self._closed = self._fitted = False
        check_wandb(cfg.wandb)
        # Stop signals are caught from here to close(): one during the set-up (a preemption while the data is
        # prepared, say) stops the run before its first step, rather than killing it.
        self.stop_signals = StopSignals(cfg.checkpoint.stop_timeout_s).__enter__()
        try:
            self.strategy = build_strategy(cfg)
            self._set_up()
        except BaseException:
            self.close()
            raise

    def _set_up(self) -> None:
        cfg = self.cfg
        self.device = self.strategy.device
        self.output_dir = Path(cfg.output_dir)
        check_world_size(cfg, self.strategy.world_size)
        check_qlora(cfg.model.lora, cfg.model.name_or_path, cfg.strategy.name, self.device)
        torch.manual_seed(cfg.seed)

        self.tokenizer, self.chat_template = build_tokenizer(cfg.model, cfg.data)
        self.pad_id = pad_token_id(self.tokenizer)
        with self._main_first():  # rank 0 prepares (and caches) the data; the others then read the cache
            self.train_set, self.eval_set, self.data_report = build_datasets(
                cfg.data, cfg.eval, self.tokenizer, self.chat_template, cfg.seed
            )
            eval_sources, reports = (
                build_eval_sources(cfg, self.tokenizer, self.chat_template) if cfg.eval.every_steps else ({}, {})
            )
        if reports:
            self.data_report["eval_sources"] = reports
        if cfg.train.global_batch_size > len(self.train_set):
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} is larger than the "
                f"{len(self.train_set)} training records: every step would repeat samples"
            )
        self.identity = run_identity(cfg, self.data_report)
        self.resume_from, resumed = find_checkpoint(cfg, self.output_dir, self.identity, self.strategy)

        with self.strategy.constructing():  # fsdp2, zero3: never the whole model on a rank (their setup loads it)
            model = build_model(cfg.model, self.tokenizer, cfg.seed, with_weights=not self.strategy.loads_weights)
        limit = max_positions(model)
        if limit is not None and cfg.data.max_length > limit:
            raise ConfigError(
                f"data.max_length={cfg.data.max_length} exceeds the model's "
                f"max_position_embeddings={limit}; lower data.max_length"
            )
        self.num_params, self.num_trained = num_parameters(model), num_parameters(model, trainable_only=True)
        self.dims = ModelDims.of(model)
        self.peak_tflops = peak_tflops(self.device, cfg.train.peak_tflops)
        self.attention = "sdpa (padded)"
        if cfg.data.packing:
            self.attention = resolve_backend(cfg.model.attn_impl, self.device, cfg.precision)
            apply_packed_attention(model, self.attention)
        self.model, self.optimizer = self.strategy.setup(
            model,
            lambda m: build_optimizer(m, cfg.train),
            lambda names: model_weights(cfg.model, self.tokenizer, cfg.seed, names),
        )
        self.loss_impl, self.loss_why = self._choose_loss_impl()
        self.sampler = self._build_sampler(resumed)  # before the checkpoint's weights: model_loss is the base's
        probes = build_probes(cfg, self.eval_set, self.tokenizer) if cfg.eval.every_steps else []
        self.evaluator = Evaluator(
            cfg, self.eval_set, self.eval_buckets, eval_sources, probes, self.tokenizer, self.chat_template
        )
        self.start_step = 0
        if self.resume_from is not None:
            load_checkpoint(self.resume_from, self.strategy, self.model, self.optimizer)
            self.start_step = resumed["step"]
        if self.strategy.is_main:  # only once the inputs proved good: a failed start leaves no trace
            self._prepare_output_dir()
        # The W&B run continues where this output_dir's own run is resumed; a run branched off another's
        # checkpoint (resume=PATH elsewhere) is a W&B run of its own.
        own = (
            self.resume_from is not None
            and self.resume_from.parent.resolve() == checkpoints_dir(self.output_dir).resolve()
        )
        self.wandb_run_id = resumed["wandb_run_id"] if own else uuid.uuid4().hex[:12]
        self.metrics = build_metrics_logger(
            cfg.wandb,
            self.output_dir,
            OmegaConf.to_container(OmegaConf.structured(cfg)),
            self.strategy.is_main,
            run_id=self.wandb_run_id,
            resume_step=self.start_step if self.resume_from is not None else None,
        )
        self._log_plan()

    def _build_sampler(self, resumed: dict[str, Any]) -> StepSampler | CurriculumSampler:
        """The step sampler: uniform, or the curriculum's (its buckets from the checkpoint when resuming)."""
        cfg, self.eval_buckets = self.cfg, None
        if cfg.curriculum.name == "none":
            return StepSampler(len(self.train_set), cfg.train.global_batch_size, cfg.seed)
        saved = None
        if self.resume_from is not None:
            saved = (np.load(self.resume_from / CURRICULUM_FILE, allow_pickle=False), resumed["curriculum"]["report"])
        sampler, self.train_set, self.eval_buckets, self.row_buckets, self.data_report["curriculum"] = build_curriculum(
            cfg, self.train_set, self.eval_set, self._model_losses, saved
        )
        for warning in self.data_report["curriculum"]["warnings"] if self.strategy.is_main else []:
            log.warning("%s", warning)
        return sampler

    def _model_losses(self) -> np.ndarray:
        """The base model's loss of every prepared sample (cached), scored in rows of data.max_length tokens at
        most (packed attention costs the square of a row's length)."""
        self.model.eval()
        score = lambda: score_model_loss(  # noqa: E731
            self.train_set.table, self._logits, self.cfg.data.max_length, self.pad_id, self.strategy, self.device
        )
        return cached_model_loss(self.cfg, self.data_report["fingerprint"], score, self.strategy.is_main)

    @contextlib.contextmanager
    def _main_first(self):
        """Rank 0 runs the block first; the others run it after, or stop at once if rank 0 failed (rather
        than wait in a barrier that rank 0 never reaches)."""
        if not self.strategy.is_main:
            (failed,) = self.strategy.all_sum([0])
            if failed:
                raise DataError("rank 0 stopped while preparing the data (its error says why); stopping too")
            yield
            return
        try:
            yield
        except BaseException:
            self.strategy.all_sum([1])
            raise
        self.strategy.all_sum([0])

    def _prepare_output_dir(self) -> None:
        (self.output_dir / STOPPED_FILE).unlink(missing_ok=True)  # this run trains: not stopped (yet)
        if self.resume_from is None:
            stale = checkpoints_dir(self.output_dir)
            if stale.is_dir() and any(stale.iterdir()):  # resume=never, or none of them complete
                log.warning(
                    "%s: starting fresh (resume=%s): removing the checkpoints of an earlier run", stale, self.cfg.resume
                )
                shutil.rmtree(stale)
            if (self.output_dir / "metrics.jsonl").exists():
                log.warning(
                    "%s holds an earlier run: starting fresh, overwriting its metrics and final/", self.output_dir
                )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
        (self.output_dir / "data_report.json").write_text(json.dumps(self.data_report, indent=2) + "\n")

    def _log_plan(self) -> None:
        c, t, r = self.cfg, self.cfg.train, self.data_report
        if not self.strategy.is_main:
            return
        log.info(
            f"model: {c.model.name}, {self.num_params / 1e6:.2f}M parameters, {c.precision}, {c.strategy.name} "
            f"x {self.strategy.world_size} on {self.device.type}, attention {self.attention}, loss {self.loss_why}"
        )
        if c.model.lora.enabled:
            lora = c.model.lora
            log.info(
                f"LoRA{' on a 4-bit base (QLoRA)' if lora.load_in_4bit else ''}: r={lora.r}, alpha={lora.alpha:g}, "
                f"dropout={lora.dropout:g} on {', '.join(lora.target_modules)}: {self.num_trained / 1e6:.3f}M "
                f"parameters train ({100 * self.num_trained / self.num_params:.2f}%), the base is frozen"
            )
        log.info(
            f"data: {r['records_in']} records in, {r['records_used']} used ({r['records_train']} train, "
            f"{r['records_eval']} eval); rejected {r['rejected'] or 'none'}; filtered {r['filtered'] or 'none'}; "
            f"truncated {r['truncated']['records']}"
        )
        for name, e in r.get("eval_sources", {}).items():
            log.info(
                f"eval set {name}: {e['records_in']} records in, {e['records_used']} used; rejected "
                f"{e['rejected'] or 'none'}; filtered {e['filtered'] or 'none'}; truncated {e['truncated']['records']}"
            )
        if "curriculum" in r:
            log.info(
                f"curriculum: {c.curriculum.name} by {c.curriculum.difficulty}, buckets {r['curriculum']['train']}, "
                f"phases end at steps {self.sampler.ends}"
            )
        if self.resume_from is not None:
            log.info(f"resuming from {self.resume_from}: step {self.start_step} of {t.max_steps}")
        log.info(
            f"plan: {t.max_steps} steps x {t.global_batch_size} samples ({self.sampler.epoch(t.max_steps - 1):.2f} "
            f"epochs), micro-batches of <= {t.micro_batch_tokens} tokens"
        )

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logits(self, mb: MicroBatch) -> torch.Tensor:
        with self._autocast():
            if mb.packed:
                return self.model(
                    input_ids=mb.input_ids,
                    position_ids=mb.position_ids,
                    use_cache=False,
                    **packed_attention_kwargs(mb.cu_seqlens, mb.max_seqlen, mb.input_ids.shape[1]),
                ).logits
            return self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits

    def _ce_sum(self, mb: MicroBatch, impl: str | None = None) -> torch.Tensor:
        """The micro-batch's summed cross-entropy over its supervised targets (sftdist.loss), as ``impl`` (default:
        the run's) computes it: chunked, the model's head returns it in place of the logits."""
        if (impl or self.loss_impl) == "chunked":
            with supervised_targets(self.strategy.unwrap(self.model), mb.targets, mb.supervised_index):
                return self._logits(mb)
        return cross_entropy_sum(self._logits(mb), mb.targets)

    def _choose_loss_impl(self) -> tuple[str, str]:
        """train.loss_impl resolved (sftdist.loss.loss_impl), checked on the first training sample both ways through
        the strategy's model; rank 0's answer for all (every rank runs the same forwards)."""
        if self.cfg.train.loss_impl != "naive":
            install_loss_head(self.strategy.unwrap(self.model))

        @torch.no_grad()
        def naive_and_chunked() -> tuple[float, float]:
            self.model.eval()
            (mb,) = build_micro_batches(
                [self.train_set[0]], self.cfg.train.micro_batch_tokens, self.pad_id, self.cfg.data.packing
            )
            mb = mb.to(self.device)
            return float(self._ce_sum(mb, "naive")), float(self._ce_sum(mb, "chunked"))

        return self.strategy.broadcast_object(
            loss_impl(self.cfg.train.loss_impl, self.strategy.unwrap(self.model), naive_and_chunked)
        )

    def _step_batches(self, samples: list[Sample]) -> list[MicroBatch]:
        """This rank's micro-batches of a step (the same number on every rank), balanced by training FLOPs."""
        return build_micro_batches(
            samples,
            self.cfg.train.micro_batch_tokens,
            self.pad_id,
            self.cfg.data.packing,
            self.strategy.rank,
            self.strategy.world_size,
            self.dims.flops,
        )

    def fit(self) -> dict[str, Any]:
        """Train from ``start_step`` to ``train.max_steps``, checkpointing on the way, then export ``final/``; return
        the last step's metrics. A stop signal ends it at a step boundary, after a checkpoint, with
        ``stopped_by`` (the signal's name) in the result."""
        t = self.cfg.train
        start, metrics = time.perf_counter(), {}
        with self._progress_bar() as bar:
            if self._share_done(self.start_step):  # (a requeue of a job that had already reached it)
                return self._planned_stop(self.start_step, metrics)
            if self._stop_agreed():  # a signal came during the set-up: stop before the first step
                return self._stopped(self.start_step, metrics)
            if self.cfg.eval.every_steps and self.cfg.eval.before_training and self.start_step == 0:
                self._log_step(-1, self.evaluate(0), bar)  # the baseline, logged as step 0
            for step, samples, micro_batches in self._steps():
                lr = lr_at(step, t)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.perf_counter()
                stats = self.train_step(micro_batches)
                if not math.isfinite(stats["loss"]):  # never train on, or export, a diverged model
                    raise FloatingPointError(
                        f"step {step + 1}: the loss is {stats['loss']} (lr {lr:.3g}); "
                        "lower train.lr, or check the data and precision"
                    )
                metrics = self._step_metrics(step, lr, stats, samples, micro_batches, time.perf_counter() - step_start)
                last = step + 1 == t.max_steps
                if self.cfg.eval.every_steps and ((step + 1) % self.cfg.eval.every_steps == 0 or last):
                    metrics.update(self.evaluate(step + 1))
                self._log_step(step, metrics, bar)
                stop, planned = self._stop_agreed(), self._share_done(step + 1)
                every = self.cfg.checkpoint.every_steps
                if stop or planned or (every and ((step + 1) % every == 0 or last)):
                    self.save_checkpoint(step + 1)
                if planned:  # (also when a stop signal came in this step: the job's work is done, not cut short)
                    return self._planned_stop(step + 1, metrics)
                if stop and not last:  # at the last step, finishing (the export) is what is left to do
                    return self._stopped(step + 1, metrics)
        wall = time.perf_counter() - start
        final = self.export(self.output_dir / "final")
        if self.strategy.is_main and self.start_step == t.max_steps:
            log.info(
                "done: the checkpoint is at train.max_steps=%d, nothing left to train; final model in %s",
                t.max_steps,
                final,
            )
        elif self.strategy.is_main:
            log.info("done: steps %d-%d in %.1f s; final model in %s", self.start_step + 1, t.max_steps, wall, final)
        self.strategy.barrier()
        self._fitted = True
        return {**metrics, "wall_s": wall}

    def _steps(self) -> Iterator[tuple[int, list[Sample], list[MicroBatch]]]:
        """(step, its samples, this rank's micro-batches) from ``start_step`` on. The next step's are read, collated
        and (for a GPU) pinned in a background thread while this one trains, so the loop never waits for them."""

        def inputs(step: int) -> tuple[list[Sample], list[MicroBatch]]:
            samples = [self.train_set[i] for i in self.sampler.indices(step)]
            batches = self._step_batches(samples)
            return samples, [mb.pin() for mb in batches] if self.device.type == "cuda" else batches

        with ThreadPoolExecutor(1, thread_name_prefix="sftdist-collate") as pool:
            upcoming = pool.submit(inputs, self.start_step)
            for step in range(self.start_step, self.cfg.train.max_steps):
                samples, micro_batches = upcoming.result()
                if step + 1 < self.cfg.train.max_steps:
                    upcoming = pool.submit(inputs, step + 1)
                yield step, samples, micro_batches

    def _progress_bar(self) -> tqdm:
        return tqdm(
            total=self.cfg.train.max_steps,
            initial=self.start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.strategy.is_main and sys.stderr.isatty()),
        )

    def _step_metrics(
        self,
        step: int,
        lr: float,
        stats: dict[str, float],
        samples: list[Sample],
        micro_batches: list[MicroBatch],
        elapsed: float,
    ) -> dict[str, Any]:
        metrics = {
            "train/loss": stats["loss"],
            "train/lr": lr,
            "train/grad_norm": stats["grad_norm"],
            "train/tokens_per_s": stats["tokens"] / elapsed,
            "train/step_s": elapsed,
            "train/supervised_tokens": stats["supervised_tokens"],
            "train/packing_efficiency": stats["tokens"] / stats["slots"],
            "train/micro_batches": len(micro_batches),
            "train/epoch": self.sampler.epoch(step),
        }
        if isinstance(self.sampler, CurriculumSampler):  # the realised mixture of this step
            counts, epochs = self.sampler.counts(step), self.sampler.bucket_epochs(step)
            metrics["data/phase"] = self.sampler.phase(step) + 1
            for b, name in enumerate(BUCKETS):
                metrics[f"data/frac_{name}"] = counts[b] / self.cfg.train.global_batch_size
                metrics[f"data/epoch_{name}"] = float(epochs[b])
        if self.peak_tflops:  # model FLOPs with attention from the actual document lengths
            head_tokens = sum(s.num_supervised for s in samples) if self.loss_impl == "chunked" else None
            flops = self.dims.flops([len(s.input_ids) for s in samples], head_tokens)
            metrics["train/mfu"] = flops / (elapsed * self.strategy.world_size * self.peak_tflops * 1e12)
        if self.device.type == "cuda":
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _log_step(self, step: int, metrics: dict[str, Any], bar: tqdm) -> None:
        """metrics.jsonl and W&B on the log cadence (first, last and eval steps always); the bar, or plain lines
        when there is no terminal (a log file)."""
        t = self.cfg.train
        if step <= 0 or step + 1 == t.max_steps or (step + 1) % t.log_every_steps == 0 or "eval/loss" in metrics:
            self.metrics.log(metrics, step=step + 1)
            if bar.disable and self.strategy.is_main:
                log.info("step %d/%d | %s", step + 1, t.max_steps, _brief(metrics))
        if "eval/loss" in metrics and not bar.disable:
            bar.write(f"step {step + 1}/{t.max_steps} | {_brief(metrics)}")
        if step >= 0:  # (step -1: the eval before training)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
            bar.update(1)

    def _stop_agreed(self) -> bool:
        """Whether any rank got a stop signal: one all-reduce at the step boundary, so that all stop together."""
        (signalled,) = self.strategy.all_sum([float(self.stop_signals.requested is not None)])
        return signalled > 0

    def _share_done(self, step: int) -> bool:
        """Whether this job's share of a longer run (``train.stop_after_step``) is done after ``step`` steps."""
        stop_after = self.cfg.train.stop_after_step
        return stop_after is not None and stop_after < self.cfg.train.max_steps and step >= stop_after

    def _planned_stop(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        if self.strategy.is_main:
            log.info(
                "train.stop_after_step=%d: stopping with a checkpoint at step %d; the same command with another "
                "train.stop_after_step (or none) continues the run",
                self.cfg.train.stop_after_step,
                step,
            )
        self._fitted = True
        return {**metrics, "stopped_at": step}

    def _stopped(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """After the stop's checkpoint (at ``step``; before the first step, the one resumed from, if any)."""
        signal_name = self.stop_signals.requested or "a signal to another rank"
        checkpoint = step_dir(checkpoints_dir(self.output_dir), step) if step > self.start_step else self.resume_from
        if self.strategy.is_main:
            record_stop(self.output_dir, signal_name, step, checkpoint)
        self._fitted = True
        return {**metrics, "stopped_by": signal_name, "step": step}

    def save_checkpoint(self, step: int) -> Path:
        """``checkpoints/step_<step>``: everything an exact resume needs (a collective: every rank calls it)."""
        t = self.cfg.train
        state = {
            "lr": lr_at(step - 1, t),
            "sampler": {
                "position": step * t.global_batch_size,
                "num_samples": self.sampler.num_samples,
                "global_batch_size": t.global_batch_size,
                "seed": self.sampler.seed,
            },
            # The schedule is the config and the step; the buckets are kept whole (CURRICULUM_FILE).
            "curriculum": {"name": self.cfg.curriculum.name, "report": self.data_report.get("curriculum")},
            "wandb_run_id": self.wandb_run_id,
            "strategy": {"name": self.strategy.name, "format": self.strategy.checkpoint_format},
            "identity": self.identity,
            "config": flat_config(self.cfg),
            "sftdist_version": __version__,
        }
        begin = time.perf_counter()
        path = save_checkpoint(
            checkpoints_dir(self.output_dir),
            step,
            self.strategy,
            self.model,
            self.optimizer,
            state,
            lambda directory: self._write_main_files(directory, step),
            self.cfg.checkpoint.keep,
        )
        if self.strategy.is_main:
            log.info("checkpoint: %s (%.1f s)", path, time.perf_counter() - begin)
        return path

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (the same count on every rank): gradients of
        the step's token-mean loss over all ranks, then clip and step."""
        stats = self.accumulate_gradients(micro_batches)
        stats["grad_norm"] = self.strategy.optimizer_step(self.optimizer, self.cfg.train.max_grad_norm)
        return stats

    def accumulate_gradients(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """Forward and backward of every micro-batch; the loss is normalised once, by the supervised tokens
        of the whole step on all ranks (one all-reduce, before any backward, of counts known on the host). The host
        waits for the device once per step (the summed loss), never per micro-batch: the copies are asynchronous
        (pinned on a GPU) and every count comes from the host."""
        self.model.train()
        (num_step_tokens,) = self.strategy.all_sum([sum(mb.num_supervised for mb in micro_batches)])
        ce_total = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, mb in enumerate([mb.to(self.device) for mb in micro_batches]):
            with self.strategy.micro_step(last=i == len(micro_batches) - 1):
                ce = self._ce_sum(mb)
                self.strategy.backward(step_normalised_loss(ce, int(num_step_tokens), self.strategy.grad_divisor))
            ce_total += ce.detach()
        ce_sum, tokens, slots = self.strategy.all_sum(
            [float(ce_total), sum(mb.num_tokens for mb in micro_batches), sum(mb.num_slots for mb in micro_batches)]
        )
        return {
            "loss": ce_sum / num_step_tokens,  # the true token mean of the step
            "supervised_tokens": num_step_tokens,
            "tokens": tokens,
            "slots": slots,
        }

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """The eval metrics after ``step`` steps (sftdist.evaluation); the probes' answers go to probes.jsonl and
        W&B."""
        metrics = self.evaluator.losses(self._loss_sums, self.strategy.all_sum)
        probed, rows = self.evaluator.probe(
            self.strategy.unwrap(self.model),
            self.strategy,
            self._probe_stop_ids,
            self.pad_id,
            self.device,
            self._autocast,
        )
        self.metrics.log_probes(rows, step)
        return {**metrics, **probed}

    def _loss_sums(self, samples: list[Sample]) -> tuple[float, int]:
        """(summed cross-entropy, supervised tokens) of these samples on this rank (its share of them)."""
        self.model.eval()
        total, count = 0.0, 0
        size = self.cfg.train.global_batch_size
        for start in range(0, len(samples), size):
            for mb in self._step_batches(samples[start : start + size]):
                mb = mb.to(self.device)
                total += float(self._ce_sum(mb))
                count += mb.num_supervised
        return total, count

    def export(self, out_dir: Path) -> Path:
        """The Hugging Face directory of the trained model (weights gathered by the strategy), in the dtype it came
        in, stopping generation where the training data's assistant turns end: the same path as ``sftdist-export``
        of a checkpoint. With LoRA: the adapter there, and the merged model beside it (sftdist.export.export_lora)."""
        c = self.cfg.model
        state_dict = self.strategy.full_state_dict(self.model, trainable_only=c.lora.enabled)
        if self.strategy.is_main:
            with tempfile.TemporaryDirectory(dir=self.output_dir, prefix=".hf-meta-") as meta:
                self._write_hf_meta(Path(meta), self.cfg.train.max_steps)
                if c.lora.enabled:
                    base = functools.partial(base_model_weights, c, self.tokenizer, self.cfg.seed)
                    export_lora(Path(meta), state_dict, out_dir, c, base)
                else:
                    export_hf(Path(meta), state_dict, out_dir, trust_remote_code=c.trust_remote_code)
        return out_dir

    def _write_hf_meta(self, out_dir: Path, step: int) -> None:
        model = self.strategy.unwrap(self.model)
        info = {
            "step": step,
            "template_hash": self.data_report["template_hash"],
            "chat_template_kwargs": self.data_report["chat_template_kwargs"],  # (a server must pass the same)
            "sftdist_version": __version__,
            "data_fingerprint": self.data_report["fingerprint"],
            "tokenizer_hash": self.data_report["tokenizer_hash"],
        }
        write_hf_meta(model, self.tokenizer, out_dir, checkpoint_dtype(self.cfg.model), self._stop_tokens, info)

    def _write_main_files(self, checkpoint: Path, step: int) -> list[Path]:
        """What rank 0 alone adds to a checkpoint: the export's meta files, the curriculum's buckets."""
        self._write_hf_meta(checkpoint / HF_DIR, step)
        written = [p for p in (checkpoint / HF_DIR).rglob("*") if p.is_file()]
        if isinstance(self.sampler, CurriculumSampler):
            np.save(checkpoint / CURRICULUM_FILE, self.row_buckets, allow_pickle=False)
            written.append(checkpoint / CURRICULUM_FILE)
        return written

    @functools.cached_property
    def _probe_stop_ids(self) -> list[int]:
        """Where a probe's answer ends: at the stop tokens an export writes (the trained end-of-turn token and the
        model's EOS), else at the tokenizer's EOS."""
        ids = self._stop_tokens if self._stop_tokens is not None else self._model_eos
        return ids or ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    @functools.cached_property
    def _stop_tokens(self) -> list[int] | None:
        return stop_token_ids(self.tokenizer, self.data_report["end_of_turn_ids"], self._model_eos)

    @functools.cached_property
    def _model_eos(self) -> list[int]:
        """The model's generation config's EOS tokens (none when it has none)."""
        current = getattr(getattr(self.strategy.unwrap(self.model), "generation_config", None), "eos_token_id", None)
        return [] if current is None else [current] if isinstance(current, int) else list(current)

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
            self.stop_signals.__exit__(None, None, None)


def _brief(metrics: dict[str, Any]) -> str:
    keys = ("train/loss", "eval/loss", "train/lr", "train/grad_norm", "train/tokens_per_s")
    parts = [f"phase {metrics['data/phase']}"] if "data/phase" in metrics else []
    parts += [f"{k.split('/')[-1] if k.startswith('train') else k} {metrics[k]:.4g}" for k in keys if k in metrics]
    return " | ".join(parts)
