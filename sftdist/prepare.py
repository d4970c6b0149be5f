"""``sftdist-prepare``: read, validate, filter and encode the configured data once, into ``output_dir``.

    sftdist-prepare output_dir=prepared/chat model.name_or_path=/models/m data.path=chat.jsonl
    sftdist-train data.prepared=prepared/chat model.name_or_path=/models/m ...   # e.g. on every node

The directory holds the encoded samples, ``data_report.json``, the tokenizer it was encoded with (so
``sftdist-inspect prepared/chat`` can show it) and a manifest that ``sftdist-train`` checks against its
own tokenizer and chat template.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sftdist.cli import hydra_main
from sftdist.config import SFTConfig

log = logging.getLogger(__name__)


def prepare_to_dir(cfg: SFTConfig) -> Path:
    from sftdist.data.pipeline import prepare, quiet_datasets
    from sftdist.data.prepared import make_manifest, save_prepared
    from sftdist.model import build_tokenizer

    tokenizer, template = build_tokenizer(cfg.model, cfg.data)
    table, report = prepare(cfg.data, tokenizer, template, cfg.seed)
    with quiet_datasets():
        out = save_prepared(table, make_manifest(report), Path(cfg.output_dir))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "prepared %d of %d records (%d tokens, %d trained) into %s; rejected %s; filtered %s",
        report["records_used"],
        report["records_in"],
        report["num_tokens"],
        report["num_supervised_tokens"],
        out,
        report["rejected"] or "none",
        report["filtered"] or "none",
    )
    return out


def main() -> None:
    hydra_main("sftdist-prepare", prepare_to_dir)


if __name__ == "__main__":
    main()
