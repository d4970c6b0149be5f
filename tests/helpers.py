"""Test helpers shared by the suites (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def compose(*overrides: str):
    """The validated SFTConfig that ``sftdist-train OVERRIDES`` would train with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from sftdist.config import register_configs, to_schema

    register_configs()
    with initialize_config_module(config_module="sftdist.conf", version_base="1.3"):
        return to_schema(hydra_compose(config_name="sft", overrides=list(overrides)))


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
