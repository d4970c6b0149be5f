"""What every sftdist command shares: Hydra composition with the typed schema, logging, and turning the
user's mistakes (InputError, a missing file) into one clear line and exit status 2."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig

import sftdist.conf
from sftdist.config import SFTConfig, register_configs, to_schema, unknown_key
from sftdist.errors import ConfigError, InputError

_SWEEP_OUTPUT_DIRS: set[str] = set()  # output_dirs used by earlier jobs of a Hydra multirun in this process


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def fail(prog: str, kind: str, err: Exception) -> NoReturn:
    """A user mistake: one clear line and exit status 2 (HYDRA_FULL_ERROR=1 shows the traceback instead)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"{prog}: {kind}: {err}", file=sys.stderr)
    sys.exit(2)


def _check_sweep(output_dir: str) -> None:
    """In a multirun (-m) every job needs an output_dir of its own, or each would overwrite the last."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        resolved = os.path.realpath(output_dir)
        if resolved in _SWEEP_OUTPUT_DIRS:
            raise ConfigError(
                f"output_dir={output_dir!r} is shared by several jobs of this multirun; make it "
                "depend on the swept keys, e.g. 'output_dir=runs/lr${train.lr}'"
            )
        _SWEEP_OUTPUT_DIRS.add(resolved)


def run_checked(prog: str, action: Callable[[SFTConfig], None], cfg: DictConfig) -> None:
    """Validate ``cfg`` and run ``action`` on it; the user's mistakes end the process with one line."""
    setup_logging()
    try:
        config = to_schema(cfg)
        _check_sweep(config.output_dir)
    except ConfigError as err:
        fail(prog, "config error", err)
    try:
        action(config)
    except (InputError, FileNotFoundError) as err:
        fail(prog, "error", err)


def check_override_keys(prog: str, args: list[str]) -> None:
    """A ``key=value`` override of a key the schema does not have ends the process with one line naming it (and the
    nearest key), exit status 2, as every other config error; Hydra would print several lines and exit 1. Options
    (``--cfg job``), ``hydra.*`` keys and what Hydra cannot parse are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    conf_dir = Path(sftdist.conf.__file__).parent  # conf/ (sftdist.conf once installed)
    groups = tuple(p.name for p in conf_dir.iterdir() if p.is_dir() and not p.name.startswith("_"))
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - Hydra says what is wrong with it
            continue
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue  # +key=value is checked against the schema once composed (sftdist.config.to_schema)
        problem = unknown_key(key, groups)
        if problem:
            fail(prog, "config error", ConfigError(problem))


def hydra_main(prog: str, action: Callable[[SFTConfig], None]) -> None:
    """Run ``action`` as a Hydra app over conf/sft.yaml (overrides, --cfg job, --help, -m sweeps)."""
    import hydra

    check_override_keys(prog, sys.argv[1:])
    register_configs()
    hydra.main(config_path="pkg://sftdist.conf", config_name="sft", version_base="1.3")(
        lambda cfg: run_checked(prog, action, cfg)
    )()


def compose(overrides: list[str]) -> DictConfig:
    """The composed (not yet validated) config for ``overrides``, without Hydra taking over the command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module(config_module="sftdist.conf", version_base="1.3"):
        return hydra_compose(config_name="sft", overrides=overrides)
