"""``sftdist-train`` / ``python -m sftdist.train``: compose the config, validate it, train.

sftdist-train                                   # the embedded demo, one CPU process
sftdist-train output_dir=runs/x train.max_steps=40
sftdist-train model.name_or_path=/models/m data.path=chat.jsonl precision=bf16
sftdist-train --cfg job                         # print the composed config and exit
sftdist-train -m train.lr=1e-4,3e-4 'output_dir=runs/lr${train.lr}'   # a sweep: one output_dir per job
"""

from __future__ import annotations

from sftdist.cli import hydra_main
from sftdist.config import SFTConfig


def train(cfg: SFTConfig) -> None:
    from sftdist.trainer import Trainer  # heavy imports only once the config is known to be good

    Trainer(cfg).fit()


def main() -> None:
    hydra_main("sftdist-train", train)


if __name__ == "__main__":
    main()
