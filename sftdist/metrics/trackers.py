"""Where metrics go: ``metrics.jsonl`` in the run directory always, W&B unless disabled. Rank 0 only."""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from sftdist.config import WandbConfig
from sftdist.errors import ConfigError
from sftdist.run.layout import METRICS_FILE, PROBES_FILE
from sftdist.run.storage import write_error

log = logging.getLogger(__name__)


def wandb_key_configured() -> bool:
    """A W&B API key in the environment or in the netrc file (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto``: the WANDB_MODE environment variable if set, else online with a key and offline without."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_key_configured() else "offline"


def check_wandb(cfg: WandbConfig) -> None:
    """Fail before anything is written when W&B cannot work as configured."""
    if resolve_wandb_mode(cfg.mode) == "online" and not wandb_key_configured():
        raise ConfigError(
            "wandb.mode=online but no W&B key is configured (WANDB_API_KEY or `wandb login`); "
            "use wandb.mode=offline (sync later with `wandb sync`) or wandb.mode=disabled"
        )


class JsonlTracker:
    """One JSON object per logged step. A fresh run starts a fresh file; a resumed run keeps the rows up to the
    step it resumes from and appends, so the file holds one row per step however often the run was interrupted
    (rows logged after the checkpoint, before the interruption, are logged again by the resumed run)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step(line) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(path)
        self._file = path.open("a" if resume_step is not None else "w", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        try:
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()
        except OSError as err:
            raise write_error("the metrics", self.path, err) or err from err

    def close(self) -> None:
        self._file.close()


def _step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a row cut short by a kill (so that it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


# The probe table's columns in W&B (one row per probe per eval).
PROBE_COLUMNS = ("step", "id", "prompt", "response", "tokens", "stopped", "passed", "checks")


class WandbTracker:
    """One W&B run: train/*, eval/* and data/* on one step axis (``step``), the probe answers in a table that grows
    by the new rows of each eval (W&B's incremental tables: nothing is uploaded twice)."""

    def __init__(self, cfg: WandbConfig, mode: str, output_dir: Path, run_config: dict[str, Any], run_id: str):
        import wandb

        settings = dict(
            id=run_id,  # kept in checkpoints: a resumed run continues the same W&B run
            resume="allow",
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or output_dir.resolve().name,
            tags=list(cfg.tags) or None,
            dir=str(output_dir),
            config=run_config,
        )
        try:  # online start-up is bounded: no network or a bad key costs init_timeout_s, then the run goes on
            self._run = wandb.init(**settings, mode=mode, settings=wandb.Settings(init_timeout=cfg.init_timeout_s))
        except Exception as err:  # noqa: BLE001 - wandb raises many kinds here; none may end the training
            if mode == "offline":
                raise
            log.warning(
                "W&B: the online start-up failed (%s: %s); logging offline instead under %s (upload it later with "
                "`wandb sync`)",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
                output_dir / "wandb",
            )
            wandb.teardown()  # the failed attempt still holds the run id in W&B's service
            self._run = wandb.init(**settings, mode="offline")
        self._run.define_metric("step")
        for prefix in ("train", "eval", "data", "checkpoint"):
            self._run.define_metric(f"{prefix}/*", step_metric="step")
        for key, summary in (("eval/loss", "min"), ("eval/format_pass_rate", "max"), ("eval/eos_rate", "max")):
            self._run.define_metric(key, step_metric="step", summary=summary)
        self._table = wandb.Table(columns=list(PROBE_COLUMNS), log_mode="INCREMENTAL")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # After a resume, the steps between the checkpoint and the interruption come again: W&B keeps the first
        # (it ignores a step below its current one, with a warning); resume is exact, so they are the same values.
        self._run.log({"step": step, **metrics}, step=step)

    def log_probes(self, rows: list[dict[str, Any]], step: int) -> None:
        for row in rows:
            self._table.add_data(*[_cell(row, column, step) for column in PROBE_COLUMNS])
        self._run.log({"eval/probe_samples": self._table}, step=step)

    def alert(self, title: str, text: str) -> None:
        import wandb

        self._run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)  # (offline: kept for `wandb sync`)

    def close(self) -> None:
        self._run.finish()


def _cell(row: dict[str, Any], column: str, step: int) -> Any:
    if column == "step":
        return step
    return json.dumps(row[column]) if column == "checks" else row[column]


class ProbeFile:
    """``probes.jsonl``: one row per probe per eval (step, id, prompt, response, tokens, stopped, passed, checks),
    kept to the resumed step on a resume as metrics.jsonl is."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self._jsonl = JsonlTracker(path, resume_step)

    def log_probes(self, rows: list[dict[str, Any]], step: int) -> None:
        for row in rows:
            self._jsonl.log(row, step)

    def close(self) -> None:
        self._jsonl.close()


class MetricsLogger:
    """Fans each logged step out to the trackers; a no-op on ranks other than 0."""

    def __init__(self, trackers: list[Any]):
        self._trackers = trackers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for tracker in self._trackers:
            if hasattr(tracker, "log"):
                tracker.log(metrics, step)

    def log_probes(self, rows: list[dict[str, Any]], step: int) -> None:
        """The probes' answers of the eval at ``step`` (nothing when there are none)."""
        if not rows:
            return
        for tracker in self._trackers:
            if hasattr(tracker, "log_probes"):
                tracker.log_probes(rows, step)

    def alert(self, title: str, text: str) -> None:
        """A notice that needs a person (W&B's alerts: e-mail or Slack, as the W&B user set them up)."""
        for tracker in self._trackers:
            if hasattr(tracker, "alert"):
                tracker.alert(title, text)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()


def build_metrics_logger(
    cfg: WandbConfig,
    output_dir: Path,
    run_config: dict[str, Any],
    is_main: bool,
    run_id: str,
    resume_step: int | None = None,
) -> MetricsLogger:
    """metrics.jsonl and W&B (unless disabled) on rank 0; ``resume_step``: a run resumed from that step."""
    if not is_main:
        return MetricsLogger([])
    trackers: list[Any] = [
        JsonlTracker(output_dir / METRICS_FILE, resume_step),
        ProbeFile(output_dir / PROBES_FILE, resume_step),
    ]
    mode = resolve_wandb_mode(cfg.mode)
    if mode != "disabled":
        log.info("W&B: %s mode, run %s, files under %s", mode, run_id, output_dir / "wandb")
        trackers.append(WandbTracker(cfg, mode, output_dir, run_config, run_id))
    return MetricsLogger(trackers)
