"""One run as several Slurm jobs, one per curriculum phase (``slurm/curriculum.sh``): each phase's step range and
the overrides of its job, every job's config checked before anything is submitted.

    python -m sftdist.cli.phases [--phase 'OVERRIDES'] ... -- OVERRIDES
    ->  stdout, a line per phase: the step it ends at, then its job's own overrides ("40 train.lr=1e-4
        train.stop_after_step=40"); stderr: the phases' step ranges

Job ``i`` trains with the common overrides, then phase ``i``'s own (``--phase``, in phase order, split at white
space), then ``train.stop_after_step=<its end>`` (all but the last; ``resume=auto`` too after the first), into the
same output_dir, continuing from the checkpoint the job before it ended with. So a phase's overrides may change what
a resume may change (the learning rate, the micro-batch budget, checkpointing, ...) but not what defines the run
(the model, the data, the curriculum, the seed, the global batch, the eval hold-out, the checkpoint format,
``train.max_steps``, ``output_dir``): such a change is refused here, naming the key, rather than hours later when
the phase starts.
"""

from __future__ import annotations

import argparse
import sys

from sftdist.cli.check import check_inputs
from sftdist.cli.common import compose, fail
from sftdist.config import SFTConfig, to_schema
from sftdist.curriculum.sampler import config_phases, phase_ends
from sftdist.errors import ConfigError, InputError
from sftdist.parallel import checkpoint_format
from sftdist.run.identity import refused_changes

PROG = "sftdist-train"  # the errors are those of the command each job runs


def plan_phases(common: list[str], per_phase: list[list[str]]) -> tuple[list[int], list[list[str]], list[SFTConfig]]:
    """(the step each phase ends at, each phase's own overrides after the common ones, each phase's job config),
    or ConfigError naming the key."""
    base = to_schema(compose(common))
    if base.curriculum.name == "none":
        raise ConfigError("curriculum=none: a run in phases needs a curriculum (curriculum=three_phase)")
    if base.train.epochs is not None:
        raise ConfigError(
            f"train.epochs={base.train.epochs}: a run in phases needs train.max_steps (each phase's last step is "
            "set before the data is prepared)"
        )
    ends = phase_ends(config_phases(base.curriculum.phases), base.train.max_steps)
    if len(per_phase) > len(ends):
        raise ConfigError(f"overrides for {len(per_phase)} phases, but curriculum.phases has {len(ends)}")
    for i, (start, end) in enumerate(zip([0, *ends], ends)):
        if end <= start:
            raise ConfigError(
                f"curriculum.phases[{i}] has no step of its own at train.max_steps={base.train.max_steps} "
                f"(it ends at step {end}): raise train.max_steps"
            )
    extras, configs = [], []
    for i, end in enumerate(ends):
        extra = list(per_phase[i]) if i < len(per_phase) else []
        extra += ["resume=auto"] if i > 0 else []  # (phase 1 may start from another run; the rest continue it)
        extra += [f"train.stop_after_step={end}"] if i + 1 < len(ends) else []
        cfg = to_schema(compose([*common, *extra]))
        changed = _run_changes(base, cfg)
        if changed:
            raise ConfigError(
                f"phase {i + 1}'s overrides change {'; '.join(changed)}: the phases are one run, continued from "
                "one checkpoint to the next, and a resume keeps the model, the data, the curriculum, the seed, "
                "the global batch, the eval hold-out, the checkpoint format and the schedule's length"
            )
        check_inputs(cfg)
        extras.append(extra)
        configs.append(cfg)
    return ends, extras, configs


def _run_changes(base: SFTConfig, cfg: SFTConfig) -> list[str]:
    """``key old -> new`` for each change a phase's job would be refused at start for (or would train wrong with)."""

    def held_out(c: SFTConfig) -> int:  # eval.every_steps=0 holds none out
        return c.eval.holdout_records if c.eval.every_steps else 0

    changed = refused_changes(base, cfg)
    formats = checkpoint_format(base.strategy.name), checkpoint_format(cfg.strategy.name)
    for key, old, new in (
        ("train.max_steps", base.train.max_steps, cfg.train.max_steps),
        ("output_dir", base.output_dir, cfg.output_dir),
        ("the eval hold-out (eval.holdout_records, eval.every_steps=0)", held_out(base), held_out(cfg)),
        ("the checkpoint format (strategy)", *formats),
    ):
        if old != new:
            changed.append(f"{key} {old!r} -> {new!r}")
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sftdist.cli.phases", description=__doc__.splitlines()[0])
    parser.add_argument("--phase", action="append", default=[], help="overrides of the next phase (one string)")
    parser.add_argument("overrides", nargs="*", help="overrides of every phase")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        ends, extras, _ = plan_phases(args.overrides, [p.split() for p in args.phase])
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        fail(PROG, "config error", err)
    except (InputError, FileNotFoundError) as err:
        fail(PROG, "error", err)
    for i, (start, end) in enumerate(zip([0, *ends], ends)):
        print(f"phase {i + 1}: steps {start + 1}-{end}", file=sys.stderr)
    for end, extra in zip(ends, extras):
        print(" ".join([str(end), *extra]))


if __name__ == "__main__":
    main()
