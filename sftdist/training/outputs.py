"""The run directory at start (rank 0, once the inputs proved good: a failed start leaves no trace): an earlier
run's checkpoints removed when this one starts fresh, then the resolved config and the data report."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from sftdist.config import SFTConfig
from sftdist.data.report import DataReport
from sftdist.run.checkpoint import checkpoints_dir
from sftdist.run.layout import CONFIG_FILE, DATA_REPORT_FILE, METRICS_FILE, STOPPED_FILE

log = logging.getLogger(__name__)


def prepare_output_dir(cfg: SFTConfig, data_report: DataReport, resumed: bool) -> None:
    output_dir = Path(cfg.output_dir)
    (output_dir / STOPPED_FILE).unlink(missing_ok=True)  # this run trains: not stopped (yet)
    if not resumed:
        stale = checkpoints_dir(output_dir)
        if stale.is_dir() and any(stale.iterdir()):  # resume=never, or none of them complete
            log.warning("%s: starting fresh (resume=%s): removing the checkpoints of an earlier run", stale, cfg.resume)
            shutil.rmtree(stale)
        if (output_dir / METRICS_FILE).exists():
            log.warning("%s holds an earlier run: starting fresh, overwriting its metrics and final/", output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (output_dir / DATA_REPORT_FILE).write_text(json.dumps(data_report.to_json(), indent=2) + "\n")
