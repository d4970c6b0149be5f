"""Prepared data on disk: the encoded, filtered samples of a data configuration, keyed by a fingerprint.

A prepared directory is a saved Hugging Face dataset (columns ``input_ids``, ``labels``, ``source``, ``meta``
(JSON), ``conv`` (the canonical conversation, JSON), ``length``, ``num_supervised``; memory-mapped when loaded) plus
``sftdist_prepared.json``: the fingerprint, the tokenizer and chat-template hashes, the settings and the data
report. The cache (``data.cache_dir``, default ``$SFTDIST_CACHE_DIR`` or ``~/.cache/sftdist``) holds one per
fingerprint; ``sftdist-prepare`` writes one where it is told, for ``data.prepared=DIR``.

The fingerprint covers the content of every data file (and of the decontamination file), the tokenizer,
the chat template and every setting that changes the samples; source weights and the eval hold-out are
applied after loading and are not part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sftdist.config import DataConfig
from sftdist.data.sources import must_exist, source_files
from sftdist.errors import ConfigError

PIPELINE_VERSION = 2  # bump when encoding or filtering changes what the same inputs produce
MANIFEST = "sftdist_prepared.json"


def _update_with_path(h: hashlib._Hash, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def tokenizer_hash(tokenizer: Any) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def fingerprint(sources: list, tokenizer: Any, template: str, cfg: DataConfig) -> str:
    """A digest of everything that determines the prepared samples."""
    import jinja2
    import tokenizers
    import transformers

    h = hashlib.sha256(f"sftdist-prepared-v{PIPELINE_VERSION}".encode())
    # rendering and tokenization can change with these libraries
    h.update(f"{transformers.__version__} {tokenizers.__version__} {jinja2.__version__}".encode())
    for source in sources:
        split = [source.split] if source.split != "train" else []  # (a DatasetDict's other split)
        h.update(json.dumps([source.name, source.format, *split]).encode())
        if source.path is not None:
            for path in source_files(source.key, source.path):  # (every shard of a directory or glob)
                _update_with_path(h, path)
        else:
            h.update(json.dumps(source.records, sort_keys=True).encode())
    if cfg.filters.decontaminate:
        must_exist("data.filters.decontaminate", cfg.filters.decontaminate)
        _update_with_path(h, Path(cfg.filters.decontaminate))
    h.update(tokenizer_hash(tokenizer).encode())
    h.update(template.encode())
    settings = {
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "filters": {k: v for k, v in dataclasses.asdict(cfg.filters).items() if k != "decontaminate"},
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def make_manifest(report: dict) -> dict:
    return {
        "fingerprint": report["fingerprint"],
        "pipeline_version": PIPELINE_VERSION,
        "report": report,
        "tokenizer_hash": report["tokenizer_hash"],
        "template_hash": report["template_hash"],
        "settings": report["settings"],
    }


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("SFTDIST_CACHE_DIR") or Path.home() / ".cache" / "sftdist"
    return Path(root).expanduser() / "prepared"


def save_prepared(table: Any, manifest: dict, directory: Path, replace: bool = True) -> Path:
    """Write atomically: a temporary sibling, then a rename (a concurrent or crashed writer leaves no half).
    An existing directory is replaced only if it is a prepared directory itself (or empty); with
    ``replace=False`` (the content-addressed cache) an existing one is kept as it is."""
    directory = Path(directory)
    if not replace and directory.is_dir():
        return directory
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise ConfigError(
            f"{directory} exists and is not a prepared-data directory: refusing to replace it; "
            "choose another output_dir"
        )
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    table.save_to_disk(str(tmp))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if directory.exists():
        if not replace:  # another process wrote the same content meanwhile
            shutil.rmtree(tmp)
            return directory
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def check_prepared(directory: str | Path) -> None:
    """Raise ConfigError naming data.prepared when ``directory`` is not a prepared directory."""
    if not (Path(directory) / MANIFEST).is_file():
        raise ConfigError(
            f"data.prepared={str(directory)!r}: not a prepared directory (no {MANIFEST}); "
            "write one with sftdist-prepare"
        )


def load_prepared(directory: str | Path) -> tuple[Any, dict]:
    import datasets

    directory = Path(directory)
    check_prepared(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    return datasets.load_from_disk(str(directory)), manifest


def check_compatible(manifest: dict, directory: str | Path, tokenizer: Any, template: str, max_length: int) -> None:
    """A prepared directory must come from this tokenizer and template, within this max_length."""
    where = f"data.prepared={str(directory)!r}"
    if manifest.get("pipeline_version") != PIPELINE_VERSION:
        raise ConfigError(
            f"{where} was written by another sftdist data pipeline "
            f"(version {manifest.get('pipeline_version')}, this is {PIPELINE_VERSION}): prepare it again"
        )
    if manifest["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise ConfigError(
            f"{where} was encoded with another tokenizer ({manifest['tokenizer_hash']}, this run's is "
            f"{tokenizer_hash(tokenizer)}): prepare it with this run's model.name_or_path/model.tokenizer"
        )
    from sftdist.data.template import template_hash

    if manifest["template_hash"] != template_hash(template):
        raise ConfigError(
            f"{where} was rendered with another chat template ({manifest['template_hash']}, this run's "
            f"is {template_hash(template)}): prepare it with this run's data.chat_template"
        )
    if manifest["settings"]["max_length"] > max_length:
        raise ConfigError(
            f"{where} holds samples up to {manifest['settings']['max_length']} tokens, more than "
            f"data.max_length={max_length}"
        )
