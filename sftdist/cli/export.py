"""``sftdist-export CHECKPOINT OUT``: the Hugging Face export of any checkpoint, or of a run's newest one.

    sftdist-export outputs/sft/checkpoints/step_200 exported/      # one checkpoint
    sftdist-export outputs/sft exported/ --max-shard-size 2GB      # a run directory: its newest complete checkpoint

What it writes, and the checks before it does, are ``sftdist.run.export``'s: the same as a run's ``final/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sftdist.cli.common import fail, setup_logging
from sftdist.errors import InputError
from sftdist.run.export import DEFAULT_MAX_SHARD_SIZE, ExportError, export_checkpoint

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sftdist-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step_N directory, or a run's output_dir")
    parser.add_argument("out", type=Path, help="the Hugging Face directory to write (replaced if it exists)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="largest safetensors file")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model config's own code")
    parser.add_argument(
        "--no-merged", action="store_true", help="LoRA: write the adapter only, not the merged model (OUT_merged)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        out = export_checkpoint(
            args.checkpoint, args.out, args.max_shard_size, args.trust_remote_code, merged=not args.no_merged
        )
    except (InputError, ExportError, FileNotFoundError) as err:
        fail("sftdist-export", "error", err)
    log.info("exported to %s", out)


if __name__ == "__main__":
    main()
