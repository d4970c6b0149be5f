"""What a run says: the plan at start, then per step the metrics (loss, LR, throughput, MFU, the curriculum's
mixture), written on the log cadence to metrics.jsonl and W&B, with a progress bar on a terminal or plain lines in a
log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from sftdist.config import DEFAULT_LR, SFTConfig, run_kind
from sftdist.curriculum.sampler import BUCKETS, CurriculumSampler
from sftdist.data.batching import MicroBatch, StepSampler
from sftdist.data.dataset import Sample
from sftdist.data.report import DataReport
from sftdist.metrics import MetricsLogger
from sftdist.metrics.flops import ModelDims
from sftdist.parallel import Strategy

if TYPE_CHECKING:
    from sftdist.training.runner import ModelRunner

log = logging.getLogger(__name__)


class StepLog:
    def __init__(
        self,
        cfg: SFTConfig,
        metrics: MetricsLogger,
        strategy: Strategy,
        sampler: StepSampler | CurriculumSampler,
        dims: ModelDims,
        peak_tflops: float | None,
        loss_impl: str,
        source_names: np.ndarray | None = None,
    ):
        """``source_names``: each training sample's data source, with several sources (their per-step mixture)."""
        self.cfg, self.writer, self.strategy, self.sampler = cfg, metrics, strategy, sampler
        self.source_names = source_names
        self.sources = list(dict.fromkeys(source_names.tolist())) if source_names is not None else []
        self.dims, self.peak_tflops, self.loss_impl = dims, peak_tflops, loss_impl
        self.bar: tqdm | None = None

    def progress(self, start_step: int) -> tqdm:
        """The progress bar, as a context: shown on rank 0's terminal only."""
        self.bar = tqdm(
            total=self.cfg.train.max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.strategy.is_main and sys.stderr.isatty()),
        )
        return self.bar

    def metrics(
        self,
        step: int,
        lr: float,
        stats: dict[str, float],
        samples: list[Sample],
        micro_batches: list[MicroBatch],
        elapsed: float,
    ) -> dict[str, Any]:
        """The metrics of 0-based step ``step``, from ``train_step``'s stats and its wall time."""
        metrics = {
            "train/loss": stats["loss"],
            "train/lr": lr,
            "train/grad_norm": stats["grad_norm"],
            "train/tokens_per_s": stats["tokens"] / elapsed,
            "train/step_s": elapsed,
            "train/supervised_tokens": stats["supervised_tokens"],
            "train/padding_fraction": stats["padding"] / (stats["tokens"] + stats["padding"]),  # 0 when packed
            "train/budget_fill": stats["tokens"] / stats["budget"],  # how full the micro-batch token budgets are
            "train/packing_efficiency": stats["tokens"] / stats["slots"],  # deprecated: budget_fill when packed
            "train/micro_batches": len(micro_batches),
            "train/epoch": self.sampler.epoch(step),
        }
        if isinstance(self.sampler, CurriculumSampler):  # the realised mixture of this step
            counts, epochs = self.sampler.counts(step), self.sampler.bucket_epochs(step)
            metrics["data/phase"] = self.sampler.phase(step) + 1
            for b, name in enumerate(BUCKETS):
                metrics[f"data/frac_{name}"] = counts[b] / self.cfg.train.global_batch_size
                metrics[f"data/epoch_{name}"] = float(epochs[b])
        if self.source_names is not None:  # the realised mixture of this step's samples
            names, counts = np.unique(self.source_names[self.sampler.indices(step)], return_counts=True)
            drawn = dict(zip(names.tolist(), counts.tolist()))
            for name in self.sources:
                metrics[f"data/source/{name}"] = drawn.get(name, 0) / self.cfg.train.global_batch_size
        if self.peak_tflops:  # model FLOPs with attention from the actual document lengths
            head_tokens = sum(s.num_supervised for s in samples) if self.loss_impl == "chunked" else None
            flops = self.dims.flops([len(s.input_ids) for s in samples], head_tokens)
            metrics["train/mfu"] = flops / (elapsed * self.strategy.world_size * self.peak_tflops * 1e12)
        if self.strategy.device.type == "cuda":
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.strategy.device) / 2**30
        return metrics

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """metrics.jsonl and W&B on the log cadence (first, last and eval steps always); the bar, or plain lines
        when there is no terminal (a log file). Step -1 is the eval before training, logged as step 0."""
        t, bar = self.cfg.train, self.bar
        if step <= 0 or step + 1 == t.max_steps or (step + 1) % t.log_every_steps == 0 or "eval/loss" in metrics:
            self.writer.log(metrics, step=step + 1)
            if bar.disable and self.strategy.is_main:
                log.info("step %d/%d | %s", step + 1, t.max_steps, _brief(metrics))
        if "eval/loss" in metrics and not bar.disable:
            bar.write(f"step {step + 1}/{t.max_steps} | {_brief(metrics)}")
        if step >= 0:
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
            bar.update(1)

    def done(self, start_step: int, last_step: int, wall: float, final: Path) -> None:
        """The last line of a run trained to its end (rank 0): train.max_steps, or an early stop at ``last_step``."""
        steps = last_step
        if self.strategy.is_main and start_step == steps:
            log.info("done: the checkpoint is at step %d, nothing left to train; final model in %s", steps, final)
        elif self.strategy.is_main:
            log.info("done: steps %d-%d in %.1f s; final model in %s", start_step + 1, steps, wall, final)


def _brief(metrics: dict[str, Any]) -> str:
    keys = ("train/loss", "eval/loss", "train/lr", "train/grad_norm", "train/tokens_per_s")
    parts = [f"phase {metrics['data/phase']}"] if "data/phase" in metrics else []
    parts += [f"{k.split('/')[-1] if k.startswith('train') else k} {metrics[k]:.4g}" for k in keys if k in metrics]
    return " | ".join(parts)


def log_plan(
    cfg: SFTConfig,
    report: DataReport,
    *,
    world_size: int,
    device: torch.device,
    runner: ModelRunner,
    sampler: StepSampler | CurriculumSampler,
    resume_from: Path | None,
    start_step: int,
) -> None:
    """The run's plan, on rank 0, before the first step: model, LoRA, data, curriculum, resume, steps."""
    c, t, r = cfg, cfg.train, report
    num_params, num_trained = runner.num_params, runner.num_trained
    log.info(
        f"model: {c.model.name}, {num_params / 1e6:.2f}M parameters, {c.precision}, {c.strategy.name} "
        f"x {world_size} on {device.type}, attention {runner.attention}, loss {runner.loss_why}"
    )
    if c.model.lora.enabled:
        lora = c.model.lora
        log.info(
            f"LoRA{' on a 4-bit base (QLoRA)' if lora.load_in_4bit else ''}: r={lora.r}, alpha={lora.alpha:g}, "
            f"dropout={lora.dropout:g} on {', '.join(lora.target_modules)}: {num_trained / 1e6:.3f}M "
            f"parameters train ({100 * num_trained / num_params:.2f}%), the base is frozen"
        )
    log.info(
        f"data: {r.records_in} records in, {r.records_used} used ({r.records_train} train, {r.records_eval} eval); "
        f"rejected {r.rejected or 'none'}; filtered {r.filtered or 'none'}; truncated {r.truncated['records']}"
    )
    for name, e in (r.eval_sources or {}).items():
        log.info(
            f"eval set {name}: {e['records_in']} records in, {e['records_used']} used; rejected "
            f"{e['rejected'] or 'none'}; filtered {e['filtered'] or 'none'}; truncated {e['truncated']['records']}"
        )
    if r.curriculum is not None:
        log.info(
            f"curriculum: {c.curriculum.name} by {c.curriculum.difficulty}, buckets {r.curriculum['train']}, "
            f"phases end at steps {sampler.ends}"
        )
    if resume_from is not None:
        log.info(f"resuming from {resume_from}: step {start_step} of {t.max_steps}")
    log.info(
        f"plan: {t.max_steps} steps{f' (train.epochs={t.epochs:g})' if t.epochs is not None else ''} x "
        f"{t.global_batch_size} samples ({sampler.epoch(t.max_steps - 1):.2f} epochs), micro-batches of <= "
        f"{t.micro_batch_tokens} tokens, peak lr {t.lr:g}"
        + (f" (the default for {run_kind(c)})" if t.lr == DEFAULT_LR[run_kind(c)] else "")
    )
