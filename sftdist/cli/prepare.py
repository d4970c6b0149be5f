"""``sftdist-prepare``: read, validate, filter and encode the configured data once, into ``output_dir``.

    sftdist-prepare output_dir=prepared/chat model.name_or_path=/models/m data.path=chat.jsonl
    sftdist-train data.prepared=prepared/chat model.name_or_path=/models/m ...   # e.g. on every node

The directory holds the encoded samples, ``data_report.json``, the tokenizer it was encoded with (so
``sftdist-inspect prepared/chat`` can show it) and a manifest that ``sftdist-train`` checks against its
own tokenizer and chat template.

Records stream through in bounded memory, and the log shows the progress (records/s, tokens/s, time left). A
preparation that was stopped (Ctrl-C, a preempted job) continues when run again with the same settings: the shards
it finished are kept (in ``output_dir.partial``). Run again on a finished directory with the same data, it does
nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sftdist.cli.common import hydra_main
from sftdist.config import SFTConfig
from sftdist.run.layout import DATA_REPORT_FILE
from sftdist.run.lock import RunLock

log = logging.getLogger(__name__)


def prepare_to_dir(cfg: SFTConfig) -> Path:
    from sftdist.data.pipeline import prepare_into
    from sftdist.model import build_tokenizer

    tokenizer, template = build_tokenizer(cfg.model, cfg.data)
    out = Path(cfg.output_dir)
    # One preparation per output_dir (a lock file beside it: the directory itself is moved into place whole)
    beside = out.resolve()
    lock = RunLock(out, path=beside.with_name(f"{beside.name}.lock"), holder="the preparation")
    lock.acquire()
    try:
        report = prepare_into(cfg.data, tokenizer, template, cfg.seed, out)
        tokenizer.save_pretrained(str(out / "tokenizer"))
        (out / DATA_REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    except KeyboardInterrupt:
        partial = out.with_name(f"{out.name}.partial")
        done = len(list(partial.glob("shard-*.json")))
        log.warning("stopped: %d finished shards kept in %s; the same command continues from them", done, partial)
        raise SystemExit(130) from None
    finally:
        lock.release()
    log.info(
        "prepared %d of %d records (%d tokens, %d trained) into %s; rejected %s; filtered %s",
        report.records_used,
        report.records_in,
        report.num_tokens,
        report.num_supervised_tokens,
        out,
        report.rejected or "none",
        report.filtered or "none",
    )
    return out


def main() -> None:
    hydra_main("sftdist-prepare", prepare_to_dir)


if __name__ == "__main__":
    main()
