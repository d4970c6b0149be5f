"""Distributed scenarios, run under torchrun (2 processes, gloo) by tests/distributed/test_strategies.py,
grouped in one launch because process groups are slow to start. Results go to OUT/results.json (rank 0).

    PYTHONPATH=tests torchrun --standalone --nproc_per_node=2 tests/distributed/scenarios.py OUT DATA

- grads/<strategy>/<packing>: one step's reduced gradients (ModelRunner.accumulate_gradients, the training
  path) against the single-process full-batch gradient computed here, sample by sample, on rank 0.
- fit/<strategy>/<packing>: 3 optimizer steps through Trainer.fit into OUT/fit-<strategy>-<packing>;
  the test compares final/ with a single-process run.
- naive_loss/<strategy>, grad_sync_last/fsdp2: fit with train.loss_impl=naive (fsdp2, zero3; the fit scenarios use
  the chunked loss), and fsdp2 reducing gradients once per step.
- lora/<strategy>: fit with LoRA adapters (dropout 0); lora_resume/<strategy>: the resume scenario with LoRA (fsdp2,
  zero3); the tests compare with one process, and straight with resumed.
- load/<strategy>: a bf16 model directory with tied embeddings loaded by fsdp2 (meta device, then shard by shard)
  and zero3 (partitioned as built); its gathered weights in OUT/load-<strategy>.pt.
- bad_global_batch: train.global_batch_size=3 on 2 processes must be refused at start.
- resume/<strategy>: 4 steps straight, and the same stopped by SIGUSR1 (to rank 0 only) during step 3, then
  resumed; the test compares them bitwise.
- one_to_two: a checkpoint of one process (OUT/single-stopped, written by the test) resumed by fsdp2 on two.
- ddp_to_fsdp2: the ddp checkpoint of resume/ddp resumed by fsdp2 (the same format, another strategy).
- curriculum/<difficulty>: the three-phase curriculum on fsdp2 (meta labels; model_loss scored by both ranks).
- skip/<strategy>: 4 steps, the second NaN on rank 0 only (poison_steps): left out on every rank; the test compares
  with one process that never trains that step. diverged/zero3: every step NaN, one in a row allowed: both ranks stop
  after step 2 with its checkpoint and the same one-line error.
- cp_attention: context-parallel sdpa attention (2 ranks) against the whole row's, fp64: outputs and q, k, v gradients.
  cp/<strategy>: fit with strategy.context_parallel=2 (one group of 2: each packed row split over both ranks); the
  test compares with one process.
- probes/<strategy>: the evals before and after one step of a briefly trained demo model (the test trains it into
  OUT/probe-model before the launch): held-out loss per source (two sources) and on an extra eval set, and probes
  whose answers end at very different lengths on the two ranks (OUT/uneven-probes.jsonl, in batches of 2).
- zero3_on_one (``... scenarios.py OUT DATA zero3_on_one`` on one process): the 2-process zero3 checkpoint refused.
- crash (``torchrun --max-restarts=1 ... OUT DATA crash``): with $SFTDIST_TEST_STRATEGY, rank 1 SIGKILLed after
  step $SFTDIST_TEST_KILL_STEP on the first attempt; the restarted ranks resume from the newest complete checkpoint.

Selected scenarios (a third argument, comma-separated prefixes) write OUT/results-<selection>.json instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from helpers import compose, fit_and_close, full_grads, poison_steps, record_sample_steps, signal_during_step
from sftdist.errors import ConfigError
from sftdist.run.checkpoint import CheckpointError
from sftdist.training import Trainer

STRATEGIES = ("ddp", "fsdp2", "zero3")


def common(out: Path, data: str) -> list[str]:
    return [
        f"data.path={data}",
        "data.max_length=160",
        "data.truncation=truncate",
        "train.micro_batch_tokens=160",
        "train.global_batch_size=8",
        "eval.every_steps=0",
        "wandb.mode=disabled",
        "train.max_steps=3",
        f"data.cache_dir={out / 'cache'}",
    ]


def probe_settings(out: Path) -> list[str]:
    """The probe scenarios' run, also trained on one process by the test."""
    return [
        f"model.name_or_path={out / 'probe-model' / 'final'}",
        f"data.sources=[{{path: {out / 'data.jsonl'}, name: uneven}}, {{path: {out / 'demo.jsonl'}, name: demo}}]",
        f"eval.sources=[{{path: {out / 'extra-eval.jsonl'}, name: extra}}]",
        "train.max_steps=1",
        "train.global_batch_size=8",
        "eval.every_steps=1",
        f"eval.probes.path={out / 'uneven-probes.jsonl'}",
        "eval.probes.batch_size=2",
        "eval.probes.max_new_tokens=96",
        "wandb.mode=disabled",
        f"data.cache_dir={out / 'cache'}",
    ]


def cp_attention(out: Path) -> dict:
    """Context-parallel sdpa attention against the unsharded packed attention on the whole row, fp64: the outputs of
    this rank's queries and the gradients of its q, k and v shards (the k and v gradients carry the other rank's
    queries' part, through the gather), with samples across the shard boundaries, a sliding window, and a row whose
    second rank holds no real token."""
    from sftdist.data.batching import ContextShard, shard_plan
    from sftdist.model.attention import packed_attention_kwargs, sdpa_forward
    from sftdist.parallel.context import context_group

    group, rank, cp = context_group(2), dist.get_rank(), 2
    worst = 0.0
    for lengths, window in (([5, 11, 3, 8], None), ([5, 11, 3, 8], 4), ([1], None)):
        padded, index = shard_plan(lengths, cp)
        total = sum(padded)
        g = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, 4, total, 8, generator=g, dtype=torch.float64) for _ in range(3))
        k, v = k[:, :2], v[:, :2]  # GQA: 4 query heads, 2 key/value heads
        weight = torch.randn(1, total, 4, 8, generator=g, dtype=torch.float64)
        cu = torch.tensor([0, *np.cumsum(padded)], dtype=torch.int32)
        module = torch.nn.Module()
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref, _ = sdpa_forward(
            module, *full, None, sliding_window=window, **packed_attention_kwargs(cu, max(padded), total)
        )
        (ref * weight).sum().backward()
        local = torch.from_numpy(index[rank])
        mine = [t[:, :, local].clone().requires_grad_() for t in (q, k, v)]
        kwargs = packed_attention_kwargs(
            cu, max(padded), total, ContextShard(local, torch.from_numpy(np.concatenate(index))), group
        )
        ours, _ = sdpa_forward(module, *mine, None, sliding_window=window, **kwargs)
        (ours * weight[:, local]).sum().backward()
        pairs = [(ours, ref[:, local])] + [(m.grad, f.grad[:, :, local]) for m, f in zip(mine, full)]
        worst = max(worst, *(float((a - b).abs().max()) for a, b in pairs))
    return {"max_abs": worst}


def probes(out: Path, strategy: str) -> dict:
    run = out / f"probes-{strategy}"
    fit_and_close(Trainer(compose(*probe_settings(out), f"strategy={strategy}", f"output_dir={run}")))
    return {"output_dir": str(run)}


def reference_grads(trainer: Trainer, samples) -> dict[str, torch.Tensor]:
    """Single-process full-batch gradient of the step's token-mean loss, one sample at a time, with a
    fresh copy of the initial model and no packing, masking or strategy code of ours."""
    from sftdist.model import build_model

    model = build_model(trainer.cfg.model, trainer.tokenizer, trainer.cfg.seed)
    total, count = 0.0, 0
    for s in samples:
        logits = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0, :-1]
        targets = torch.tensor(s.labels[1:])
        total = total + torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    (total / count).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def grads(out: Path, data: str, strategy: str, packing: bool) -> dict:
    trainer = Trainer(
        compose(
            *common(out, data),
            f"strategy={strategy}",
            f"data.packing={str(packing).lower()}",
            f"output_dir={out / f'grads-{strategy}-{packing}'}",
        )
    )
    samples = [trainer.train_set[i] for i in trainer.sampler.indices(0)]
    mbs = trainer.feed.batches(samples)
    stats = trainer.runner.accumulate_gradients(mbs)
    got = full_grads(trainer)
    mine = {
        "micro_batches": len(mbs),
        "real": sum(mb.num_tokens > 0 for mb in mbs),
        "supervised": sum(mb.num_supervised for mb in mbs),
        "tokens": sum(mb.num_tokens for mb in mbs),
        "per_micro_batch": [mb.num_supervised for mb in mbs],
    }
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    result = {"ranks": per_rank, "loss": stats["loss"], "supervised_tokens": stats["supervised_tokens"]}
    if dist.get_rank() == 0:
        ref = reference_grads(trainer, samples)
        assert set(got) == set(ref), sorted(set(got) ^ set(ref))
        result["max_rel"] = max(float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in ref)
        result["ref_supervised"] = sum(int((torch.tensor(s.labels[1:]) != -100).sum()) for s in samples)
    dist.barrier()
    return result


def fit(out: Path, data: str, strategy: str, packing: bool, *extra: str) -> dict:
    run = out / f"fit-{strategy}-{packing}{''.join('-' + e.split('=')[-1] for e in extra)}"
    trainer = Trainer(
        compose(
            *common(out, data),
            f"strategy={strategy}",
            f"data.packing={str(packing).lower()}",
            f"output_dir={run}",
            *extra,
        )
    )
    result = trainer.fit()
    return {"loss": result["train/loss"], "output_dir": str(run), "loss_impl": trainer.runner.loss_impl}


# A non-finite step: 4 steps, the second one's forward NaN on rank 0 only (left out on every rank).
SKIP = ("train.max_steps=4", "checkpoint.every_steps=0")
SKIPPED_STEP = 1


def skip(out: Path, data: str, strategy: str) -> dict:
    run = out / f"skip-{strategy}"
    trainer = Trainer(compose(*common(out, data), *SKIP, f"strategy={strategy}", f"output_dir={run}"))
    poison_steps(trainer, {SKIPPED_STEP})
    fit_and_close(trainer)
    return {"output_dir": str(run)}


def diverged(out: Path, data: str, strategy: str) -> dict:
    """Every step NaN on rank 0, at most one in a row allowed: both ranks stop after step 2 with its checkpoint."""
    run = out / f"diverged-{strategy}"
    trainer = Trainer(
        compose(*common(out, data), "train.skip_nonfinite_steps=1", f"strategy={strategy}", f"output_dir={run}")
    )
    poison_steps(trainer, set(range(10)))
    try:
        fit_and_close(trainer)
        message = None
    except FloatingPointError as err:
        message = f"{type(err).__name__}: {err}"
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return {"messages": messages, "output_dir": str(run)}


# Exact resume: 4 steps, checkpoints at 2 and 4 (the last), a stop signal during step 3 (to rank 0 only).
RESUME = ("train.max_steps=4", "checkpoint.every_steps=2")
# LoRA without dropout: its masks would depend on the ranks' RNG streams, as any dropout's do.
LORA = ("model.lora.enabled=true", "model.lora.dropout=0.0")


def resume(out: Path, data: str, strategy: str, *extra: str, name: str = "resume") -> dict:
    """4 steps straight, against: stopped by SIGUSR1 during step 3 (rank 0 alone gets it, so the ranks must agree),
    then resumed by a new Trainer in the same output_dir. The test compares losses and weights bitwise."""
    args = (*common(out, data), f"strategy={strategy}", *RESUME, *extra)
    straight, stopped = out / f"{name}-{strategy}-straight", out / f"{name}-{strategy}-stopped"
    fit_and_close(Trainer(compose(*args, f"output_dir={straight}")))
    first = Trainer(compose(*args, f"output_dir={stopped}"))
    signal_during_step(first, 3)
    samples = record_sample_steps(first)
    interrupted = fit_and_close(first)
    second = Trainer(compose(*args, f"output_dir={stopped}"))
    resumed_samples = record_sample_steps(second)
    fit_and_close(second)
    return {
        "straight": str(straight),
        "stopped": str(stopped),
        "stopped_by": interrupted.get("stopped_by"),
        "stop_step": interrupted.get("step"),
        "resumed_from": str(second.resume_from),
        "start_step": second.start_step,
        "samples": samples + resumed_samples,
    }


def resume_on_fsdp2(out: Path, data: str, checkpoint: Path, name: str) -> dict:
    """Copy ``checkpoint`` into a new run directory and resume it with fsdp2 on this launch's two processes:
    a checkpoint of one process (one_to_two: the test wrote it before this launch), or of ddp (ddp_to_fsdp2:
    another strategy of the same format)."""
    run = out / name
    if dist.get_rank() == 0:
        shutil.copytree(checkpoint, run / "checkpoints" / checkpoint.name)
    dist.barrier()
    trainer = Trainer(compose(*common(out, data), "strategy=fsdp2", *RESUME, f"output_dir={run}"))
    samples = record_sample_steps(trainer)
    fit_and_close(trainer)
    return {"output_dir": str(run), "start_step": trainer.start_step, "samples": samples}


def curriculum(out: Path, data: str, difficulty: str) -> dict:
    """The three-phase curriculum on two fsdp2 processes; with model_loss, the ranks share the scoring."""
    run = out / f"curriculum-{difficulty}"
    trainer = Trainer(
        compose(
            *common(out, data),
            "strategy=fsdp2",
            *RESUME,
            "curriculum=three_phase",
            f"curriculum.difficulty={difficulty}",
            f"output_dir={run}",
        )
    )
    samples = record_sample_steps(trainer)
    fit_and_close(trainer)
    return {"output_dir": str(run), "samples": samples, "buckets": trainer.checkpointer.row_buckets.tolist()}


def load(out: Path, data: str, strategy: str) -> dict:
    """The model of a bf16 directory with tied embeddings (OUT/tied-bf16, written by the test), built without its
    weights and loaded shard by shard (fsdp2) or partitioned (zero3): its gathered weights, and what was logged."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("sftdist").addHandler(handler)
    try:
        trainer = Trainer(
            compose(
                *common(out, data),
                f"model.name_or_path={out / 'tied-bf16'}",
                f"strategy={strategy}",
                f"output_dir={out / f'load-{strategy}'}",
            )
        )
        weights = trainer.strategy.full_state_dict(trainer.model)
        trainer.close()
    finally:
        logging.getLogger("sftdist").removeHandler(handler)
    if dist.get_rank() == 0:
        torch.save(weights, out / f"load-{strategy}.pt")
    return {"logged": records}


def zero3_on_one(out: Path, data: str) -> dict:
    """On one process: the 2-process zero3 checkpoint must be refused at start, naming what to do."""
    checkpoint = out / "resume-zero3-stopped" / "checkpoints" / "step_3"
    try:
        Trainer(
            compose(
                *common(out, data),
                "strategy=zero3",
                *RESUME,
                f"resume={checkpoint}",
                f"output_dir={out / 'zero3-on-one'}",
            )
        )
    except CheckpointError as err:
        return {"message": str(err)}
    return {"message": None}


def crash(out: Path, data: str) -> dict:
    """Under torchrun --max-restarts=1: on the first attempt rank 1 is killed (SIGKILL) after step
    $SFTDIST_TEST_KILL_STEP; torchrun restarts both ranks, which resume from the newest complete checkpoint."""
    strategy, attempt = os.environ["SFTDIST_TEST_STRATEGY"], int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    run = out / f"crash-{strategy}"
    trainer = Trainer(compose(*common(out, data), f"strategy={strategy}", *RESUME, f"output_dir={run}"))
    if attempt == 0:
        kill_step, original = int(os.environ["SFTDIST_TEST_KILL_STEP"]), trainer.runner.train_step

        def train_step(micro_batches):
            stats = original(micro_batches)
            if trainer.strategy.rank == 1 and len(done) + 1 == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            done.append(stats)
            return stats

        done: list = []
        trainer.runner.train_step = train_step
    fit_and_close(trainer)
    return {
        "output_dir": str(run),
        "attempt": attempt,
        "start_step": trainer.start_step,
        "resumed_from": str(trainer.resume_from),
    }


def main() -> None:
    out, data = Path(sys.argv[1]), sys.argv[2]
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    dist.init_process_group("gloo")  # the strategies join it (and leave it to us)
    results: dict[str, object] = {}
    seconds: dict[str, float] = {}  # each scenario's, into OUT/seconds.json: where the launch's time goes

    def record(name: str, fn, *args) -> None:
        if only and not any(name.startswith(o) for o in only):
            return
        start = time.monotonic()
        try:
            results[name] = fn(*args)
        except Exception as err:  # noqa: BLE001 - reported to the test, which fails with it
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        dist.barrier()
        seconds[name] = round(time.monotonic() - start, 1)

    for strategy in STRATEGIES:
        for packing in (True, False):
            record(f"grads/{strategy}/{packing}", grads, out, data, strategy, packing)
    for strategy in STRATEGIES:
        for packing in (True, False):
            record(f"fit/{strategy}/{packing}", fit, out, data, strategy, packing)
    for strategy in ("fsdp2", "zero3"):
        record(f"bf16/{strategy}", fit, out, data, strategy, True, "precision=bf16")
        record(f"naive_loss/{strategy}", fit, out, data, strategy, True, "train.loss_impl=naive")
    record("grad_sync_last/fsdp2", fit, out, data, "fsdp2", True, "strategy.grad_sync=last")
    for strategy in STRATEGIES:
        record(f"lora/{strategy}", fit, out, data, strategy, True, *LORA)
    for strategy in ("fsdp2", "zero3"):
        # (with LoRA's default dropout, 0.05: the resumed ranks draw their masks from their restored RNG states)
        lora_resume = functools.partial(resume, name="lora-resume")
        record(f"lora_resume/{strategy}", lora_resume, out, data, strategy, "model.lora.enabled=true")
    for strategy in ("fsdp2", "zero3"):
        record(f"load/{strategy}", load, out, data, strategy)
    for strategy in STRATEGIES:
        record(f"resume/{strategy}", resume, out, data, strategy)
    step_3 = Path("checkpoints") / "step_3"
    record("one_to_two", resume_on_fsdp2, out, data, out / "single-stopped" / step_3, "one-to-two")
    record("ddp_to_fsdp2", resume_on_fsdp2, out, data, out / "resume-ddp-stopped" / step_3, "ddp-to-fsdp2")
    for difficulty in ("meta", "model_loss"):
        record(f"curriculum/{difficulty}", curriculum, out, data, difficulty)
    for strategy in ("fsdp2", "zero3"):
        record(f"probes/{strategy}", probes, out, strategy)
    for strategy in STRATEGIES:
        record(f"skip/{strategy}", skip, out, data, strategy)
    record("cp_attention", cp_attention, out)
    for strategy in STRATEGIES:
        record(f"cp/{strategy}", fit, out, data, strategy, True, "strategy.context_parallel=2")
    record("diverged/zero3", diverged, out, data, "zero3")
    if only:  # launched on their own: on one process, or under torchrun --max-restarts
        record("zero3_on_one", zero3_on_one, out, data)
        record("crash", crash, out, data)

    def bad_global_batch() -> dict:
        try:
            Trainer(
                compose(*common(out, data), "strategy=ddp", "train.global_batch_size=3", f"output_dir={out / 'bad'}")
            )
        except ConfigError as err:
            return {"message": str(err), "wrote": (out / "bad").exists()}
        return {"message": None}

    record("bad_global_batch", bad_global_batch)

    def bad_data_on_rank_0() -> dict:
        """Rank 0 stops preparing the data (too many bad records): the others must stop too, not hang."""
        bad = out / "bad.jsonl"
        if dist.get_rank() == 0:
            bad.write_text("{oops\n" * 5 + Path(data).read_text().splitlines()[0] + "\n")
        dist.barrier()
        try:
            Trainer(compose(*common(out, str(bad)), "strategy=ddp", f"output_dir={out / 'bad-data'}"))
            message = None
        except Exception as err:  # noqa: BLE001
            message = f"{type(err).__name__}: {err}"
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        return {"messages": messages}

    record("bad_data_on_rank_0", bad_data_on_rank_0)
    if dist.get_rank() == 0:
        name = "results.json" if only is None else f"results-{'-'.join(only)}.json"
        (out / name).write_text(json.dumps(results, indent=2, default=str))
        (out / name.replace("results", "seconds")).write_text(json.dumps(seconds, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
