"""``sftdist-train --check``: what a run would stop on at its start, found in seconds, with no model, data or GPU
loaded: the config (composed and validated, as by every command) and the inputs it names, with the errors the run
itself raises, word for word. The Slurm templates run it before ``srun``, so that a typo costs seconds, not a
queue wait and a model load.

Not checked here (the run finds them at start): the records themselves, the tokenizer's and the template's
contents, and a checkpoint to resume from.
"""

from __future__ import annotations

import os

from sftdist.config import SFTConfig


def check_inputs(cfg: SFTConfig) -> None:
    """Raise the run's own FileNotFoundError or ConfigError for an input that is missing or not what it must be."""
    from sftdist.data.prepared import check_prepared
    from sftdist.data.sources import must_exist, source_files
    from sftdist.data.template import load_chat_template
    from sftdist.model import local_dir, model_directory

    d, m = cfg.data, cfg.model
    if d.path is not None:
        source_files("data.path", d.path)
    for i, source in enumerate(d.sources):
        source_files(f"data.sources[{i}].path", source.path)
    if d.prepared is not None:
        check_prepared(d.prepared)
    if d.filters.decontaminate is not None:
        must_exist("data.filters.decontaminate", d.filters.decontaminate)
    load_chat_template(d.chat_template)
    if m.name_or_path is not None:
        model_directory(m.name_or_path)
    if m.tokenizer is not None:
        local_dir("model.tokenizer", m.tokenizer)
    if cfg.strategy.name == "zero3":
        from sftdist.parallel.deepspeed import deepspeed_config

        deepspeed_config(cfg.strategy, cfg.precision, cfg.train.max_grad_norm)


def check(cfg: SFTConfig) -> None:
    """``sftdist-train --check``: the config is valid (the caller validated it) and the inputs are there; with
    ``WORLD_SIZE`` in the environment (the processes the launch will start), that the config allows that many."""
    if "WORLD_SIZE" in os.environ:
        from sftdist.parallel import check_world_size

        check_world_size(cfg, int(os.environ["WORLD_SIZE"]))
    check_inputs(cfg)
    print(f"sftdist-train: the config and its inputs are good (output_dir={cfg.output_dir})", flush=True)
