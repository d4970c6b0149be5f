"""``sftdist-train`` / ``python -m sftdist.train``: compose the config, validate it, train.

    sftdist-train                                   # the embedded demo, one CPU process
    sftdist-train output_dir=runs/x train.max_steps=40
    sftdist-train model.name_or_path=/models/m data.path=chat.jsonl precision=bf16
    sftdist-train --cfg job                         # print the composed config and exit
    sftdist-train -m train.lr=1e-4,3e-4 'output_dir=runs/lr${train.lr}'   # a sweep: one output_dir per job
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from sftdist.config import register_configs, to_schema
from sftdist.errors import ConfigError, InputError

_SWEEP_OUTPUT_DIRS: set[str] = set()  # output_dirs used by earlier jobs of a Hydra multirun in this process


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def _fail(kind: str, err: Exception) -> None:
    """A user mistake: one clear line and exit status 2 (HYDRA_FULL_ERROR=1 shows the traceback instead)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"sftdist-train: {kind}: {err}", file=sys.stderr)
    sys.exit(2)


def _check_sweep(output_dir: str) -> None:
    """In a multirun (-m) every job needs an output_dir of its own, or each would overwrite the last."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        resolved = os.path.realpath(output_dir)
        if resolved in _SWEEP_OUTPUT_DIRS:
            raise ConfigError(f"output_dir={output_dir!r} is shared by several jobs of this multirun; make it "
                              "depend on the swept keys, e.g. 'output_dir=runs/lr${train.lr}'")
        _SWEEP_OUTPUT_DIRS.add(resolved)


def _run(cfg: DictConfig) -> None:
    _setup_logging()
    try:
        config = to_schema(cfg)
        _check_sweep(config.output_dir)
    except ConfigError as err:
        _fail("config error", err)
    from sftdist.trainer import Trainer  # heavy imports only once the config is known to be good

    try:  # set-up reads the user's files: their mistakes are InputError / FileNotFoundError
        trainer = Trainer(config)
    except (InputError, FileNotFoundError) as err:
        _fail("error", err)
    trainer.fit()


def main() -> None:
    register_configs()
    hydra.main(config_path="pkg://sftdist.conf", config_name="sft", version_base="1.3")(_run)()


if __name__ == "__main__":
    main()
