"""``sftdist-train`` / ``python -m sftdist.train``: compose the config, validate it, train.

sftdist-train                                   # the embedded demo, one CPU process
sftdist-train output_dir=runs/x train.max_steps=40
sftdist-train model.name_or_path=/models/m data.path=chat.jsonl precision=bf16
sftdist-train --cfg job                         # print the composed config and exit
sftdist-train -m train.lr=1e-4,3e-4 'output_dir=runs/lr${train.lr}'   # a sweep: one output_dir per job
sftdist-train --check model.name_or_path=/models/m data.path=chat.jsonl  # validate config and inputs, then exit
"""

from __future__ import annotations

import sys

from sftdist.cli.common import hydra_main
from sftdist.config import SFTConfig
from sftdist.run.signals import EXIT_STOPPED, check_launcher_grace, stopped_earlier_in_this_launch


def train(cfg: SFTConfig) -> None:
    """Train; exit with EXIT_STOPPED (75) when a stop signal ended the run after a checkpoint."""
    earlier = stopped_earlier_in_this_launch(cfg.output_dir)
    if earlier is not None:  # torchrun restarted the workers that a stop signal stopped: stop again
        print(f"sftdist-train: stopped earlier in this launch by {earlier}; not training on", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    check_launcher_grace(cfg.checkpoint.stop_timeout_s)
    from sftdist.training import Trainer  # heavy imports only once the config is known to be good

    with Trainer(cfg) as trainer:  # closed also after a failure: the metrics file, W&B, the process group
        result = trainer.fit()
    if "stopped_by" in result:
        sys.exit(EXIT_STOPPED)


def main() -> None:
    if "--check" in sys.argv[1:]:  # ours, not Hydra's: validate the config and its inputs, train nothing
        sys.argv.remove("--check")
        from sftdist.cli.check import check

        hydra_main("sftdist-train", check)
    else:
        hydra_main("sftdist-train", train)


if __name__ == "__main__":
    main()
