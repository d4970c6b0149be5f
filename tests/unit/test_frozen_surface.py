"""The public surface, frozen: the console scripts, the entry modules, every config key of the schema and every
config group option. A change to any of them (a redesign that renames a module, a key added or dropped) fails here
until tests/data/frozen_surface.json is edited with it, so that every contract change is a deliberate diff.

To see the surface as it is now: ``.venv/bin/python tests/unit/test_frozen_surface.py``."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
FROZEN = REPO / "tests" / "data" / "frozen_surface.json"


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of the config schema, flattened (``train.lr``; a list of records as ``data.sources[].path``)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name, kind = f"{prefix}{field.name}", hints[field.name]
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(kind, f"{name}.")
        elif typing.get_origin(kind) is list and args and dataclasses.is_dataclass(args[0]):
            keys += schema_keys(args[0], f"{name}[].")
        else:
            keys.append(name)
    return keys


def surface() -> dict:
    from sftdist.config import SFTConfig

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted((REPO / "conf").iterdir()) if d.is_dir()}
    return {
        "console_scripts": sorted(scripts),  # (their names: the modules behind them are ours to move)
        "entry_modules": ["sftdist.train"],  # python -m / torchrun -m / srun
        "python_api": ["sftdist.data.encode_conversation", "sftdist.data.encode_samples"],
        "config_groups": groups,
        "config_keys": sorted(schema_keys(SFTConfig)),
    }


def test_the_public_surface_is_the_frozen_one():
    frozen, now = json.loads(FROZEN.read_text()), surface()
    for part in frozen:
        added, dropped = _diff(frozen[part], now[part])
        assert not (added or dropped), (
            f"{part} changed: added {added}, dropped {dropped}. A contract change must be deliberate: edit {FROZEN}"
            f" with it (and the README, DESIGN's contract and a deprecation path for what users had)"
        )
    assert set(frozen) == set(now)


def test_every_entry_point_resolves():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    for dotted in surface()["python_api"]:
        module, _, name = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), dotted
    assert importlib.util.find_spec("sftdist.train") is not None


def _diff(frozen, now) -> tuple[list, list]:
    if isinstance(frozen, dict):
        a = [f"{k}={now[k]}" for k in now if frozen.get(k) != now[k]]
        d = [f"{k}={frozen[k]}" for k in frozen if now.get(k) != frozen[k]]
        return a, d
    return sorted(set(now) - set(frozen)), sorted(set(frozen) - set(now))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(surface(), indent=1))
