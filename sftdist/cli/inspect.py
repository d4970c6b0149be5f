"""``sftdist-inspect``: see what the model will be trained on.

    sftdist-inspect data.path=chat.jsonl model.name_or_path=/models/m     # same overrides as sftdist-train
    sftdist-inspect prepared/chat --samples 5 --source glaive              # a directory from sftdist-prepare

Prints the data audit (records in, used, rejected and filtered by reason with the first offenders,
truncations, template adaptations, the supervised-token fraction per source and role, the chat-template
hash) and then a few samples with the trained tokens highlighted: green on a terminal, ``[[...]]`` otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from sftdist.cli.common import compose, fail, setup_logging
from sftdist.config import CurriculumConfig, SFTConfig
from sftdist.data.report import DataReport
from sftdist.errors import ConfigError, DataError, InputError

_GREEN, _RESET = "\033[1;32m", "\033[0m"


def role_token_counts(
    ct: Any, tokenizer: Any, conv: dict, input_ids: list[int], labels: list[int], empty_think: str = "mask"
) -> dict[str, list[int]]:
    """{role: [tokens, trained tokens]} of one sample; the role of a token is that of the message whose rendered
    region holds it ("template" for text outside every message, e.g. a BOS), but a trained token is the assistant's
    (the header that ends an answer where a template writes no end-of-turn token is in the next message's region, or
    after the last one). A sample that is not the single render of its conversation (one of several serving-exact
    samples, or a prompt and answer tokenized apart) has its untrained tokens counted as "context"."""
    from sftdist.data.samples import assistant_char_spans
    from sftdist.data.template import TemplateSplitError

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    messages, tools, _ = ct.adapt(conv["messages"], conv["tools"])
    try:
        text, _ = assistant_char_spans(ct, messages, tools, empty_think)  # (with a stop after the last answer)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except TemplateSplitError:
        encoded = {"input_ids": None}
    if encoded["input_ids"] != list(input_ids):
        for label in labels:
            role = "assistant" if label != -100 else "context"
            counts[role][0] += 1
            counts[role][1] += label != -100
        return counts
    bounds = [len(ct.render(messages[:j], False, tools)) if j else 0 for j in range(len(messages) + 1)]
    j = 0
    for (start, _end), label in zip(encoded["offset_mapping"], labels):
        while j < len(messages) and start >= bounds[j + 1]:
            j += 1
        role = messages[j]["role"] if j < len(messages) and start >= bounds[j] else "template"
        role = "assistant" if label != -100 else role
        counts[role][0] += 1
        counts[role][1] += label != -100
    return counts


def render_sample(tokenizer: Any, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The sample's text with its trained tokens marked."""
    parts, current, trained = [], [], False
    for token, label in zip(input_ids, labels):
        if (label != -100) != trained and current:
            parts.append((trained, tokenizer.decode(current)))
            current = []
        trained = label != -100
        current.append(token)
    if current:
        parts.append((trained, tokenizer.decode(current)))
    open_, close = (_GREEN, _RESET) if color else ("[[", "]]")
    return "".join(f"{open_}{text}{close}" if t else text for t, text in parts)


def format_audit(report: DataReport, roles: dict[str, dict[str, list[int]]], audit_records: int) -> str:
    lines = [
        f"records in {report.records_in}, used {report.records_used}",
        f"chat template sha256:{report.template_hash}  tokenizer {report.tokenizer_hash}  "
        f"fingerprint {report.fingerprint}",
    ]
    for kind in ("rejected", "filtered"):
        for reason, n in getattr(report, kind).items():
            first = "; ".join(report.examples.get(reason, [])[:3])
            lines.append(f"{kind} {reason}: {n}  (first: {first})")
    t = report.truncated
    lines.append(
        f"truncated: {t['records']} records, {t['tokens']} tokens removed "
        f"(data.truncation={report.settings['truncation']}, data.max_length={report.settings['max_length']})"
    )
    if report.split_records:
        lines.append(
            f"serving-exact samples: {report.split_records} records rendered differently at an earlier turn became "
            f"{report.samples - report.records_used + report.split_records} samples, repeating "
            f"{report.extra_context_tokens} context tokens ({report.samples} samples in all)"
        )
    if report.adaptations:
        lines.append(
            "adapted to the template: " + ", ".join(f"{k} in {v} records" for k, v in report.adaptations.items())
        )
    lines.append(f"supervised tokens by role (the first {audit_records} records of each source):")
    lines.append(f"{'source':<20} {'role':<10} {'tokens':>10} {'trained':>10} {'fraction':>9}")
    for source, by_role in roles.items():
        for role, (tokens, trained) in sorted(by_role.items()):
            lines.append(f"{source:<20} {role:<10} {tokens:>10} {trained:>10} {trained / max(1, tokens):>9.3f}")
    return "\n".join(lines)


def _load(target: list[str]) -> tuple[Any, DataReport, Any, str, SFTConfig]:
    """(table, report, tokenizer, template, config) from a prepared directory (with the default settings) or from
    training overrides."""
    from sftdist.config import to_schema
    from sftdist.data.prepared import MANIFEST, check_compatible, load_prepared
    from sftdist.data.template import resolve_chat_template

    if len(target) == 1 and "=" not in target[0]:
        directory = Path(target[0])
        if not (directory / MANIFEST).is_file():
            raise ConfigError(
                f"{target[0]!r} is not a prepared-data directory (no {MANIFEST}); give one written by "
                "sftdist-prepare, or sftdist-train overrides such as data.path=FILE"
            )
        from transformers import AutoTokenizer

        table, manifest = load_prepared(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
        cfg = to_schema(compose([f"data.prepared={directory}"]))
        return table, DataReport.from_json(manifest["report"]), tokenizer, resolve_chat_template(tokenizer), cfg
    from sftdist.data.pipeline import prepare
    from sftdist.model import build_tokenizer

    cfg = to_schema(compose(target))
    tokenizer, template = build_tokenizer(cfg.model, cfg.data)
    if cfg.data.prepared is not None:
        table, manifest = load_prepared(cfg.data.prepared)
        check_compatible(manifest, cfg.data.prepared, tokenizer, template, cfg.data)
        return table, DataReport.from_json(manifest["report"]), tokenizer, template, cfg
    cfg.data.max_rejected_fraction = 1.0  # show every rejection instead of stopping at the first threshold
    table, report = prepare(cfg.data, tokenizer, template, cfg.seed)
    return table, report, tokenizer, template, cfg


def inspect_data(target: list[str], samples: int, source: str | None, color: bool, audit_records: int) -> str:
    from sftdist.data.template import bind_template

    table, report, tokenizer, template, cfg = _load(target)
    # (as the data was prepared: a prepared directory's own settings)
    ct = bind_template(tokenizer, template, report.chat_template_kwargs)
    empty_think = report.settings.get("empty_think", "mask")
    parts = table.data.column("part").to_numpy()
    roles: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    seen: dict[str, int] = defaultdict(int)
    shown, out = 0, []
    for i, row in enumerate(table):
        name = row["source"]
        if source is not None and name != source:
            continue
        if seen[name] < audit_records:
            seen[name] += row["part"] == 0
            conv = json.loads(row["conv"])
            for role, (n, k) in role_token_counts(
                ct, tokenizer, conv, row["input_ids"], row["labels"], empty_think
            ).items():
                roles[name][role][0] += n
                roles[name][role][1] += k
        if shown < samples:
            shown += 1
            out.append(
                f"== sample {shown} ({name}, {row['length']} tokens, {row['num_supervised']} trained"
                f"{_split(parts, i)}) ==\n" + render_sample(tokenizer, row["input_ids"], row["labels"], color)
            )
        if shown >= samples and all(v >= audit_records for v in seen.values()) and len(seen) == len(report.sources):
            break
    if source is not None and not seen:
        raise ConfigError(f"--source {source!r}: no such source (sources: {', '.join(report.sources)})")
    audit = format_audit(report, roles, audit_records) + "\n" + format_buckets(table, cfg.curriculum)
    audit += "\n" + format_probes(cfg, table, report, tokenizer)
    return "== data audit ==\n" + audit + "\n\n" + "\n\n".join(out)


def _split(parts: Any, row: int) -> str:
    """How the record of a row became samples, where it became several."""
    start = row - int(parts[row])
    size = next((j for j in range(start + 1, len(parts)) if parts[j] == 0), len(parts)) - start
    if size == 1:
        return ""
    return f"; sample {parts[row] + 1} of {size} of its record: its template renders earlier turns differently later"


def format_buckets(table: Any, c: CurriculumConfig) -> str:
    """The difficulty buckets a curriculum would draw from (every prepared record, per source)."""
    import numpy as np

    from sftdist.curriculum.difficulty import assign_buckets, bucket_report

    if "model_loss" in (c.difficulty, c.fallback if c.difficulty == "meta" else None):
        return (
            f"difficulty buckets (curriculum.difficulty={c.difficulty}): the base model's losses are scored "
            "by sftdist-train, before training (and cached)"
        )
    rows = np.arange(len(table))
    buckets, report = assign_buckets(table, rows, c, model_losses=None)
    sizes = bucket_report(buckets, rows, rows[:0], table.data.column("source").to_pylist())
    how = f"curriculum.difficulty={c.difficulty}"
    if c.difficulty == "meta":
        missing = "left out" if c.on_missing == "reject" else f"scored by {c.fallback}"
        how += f", {report['unlabelled']} unlabelled ({missing})"
    lines = [f"difficulty buckets ({how}): " + ", ".join(f"{k} {v}" for k, v in sizes["train"].items())]
    lines += [f"  {source}: " + ", ".join(f"{k} {v}" for k, v in n.items()) for source, n in sizes["by_source"].items()]
    return "\n".join(lines)


def format_probes(cfg: SFTConfig, table: Any, report: DataReport, tokenizer: Any) -> str:
    """The generation probes a run with these settings asks at every eval, and the checks of each."""
    from sftdist.data.dataset import EncodedSet, split_and_weight
    from sftdist.training.evaluation import build_probes

    if not cfg.eval.every_steps:
        return "probes: none (eval.every_steps=0)"
    weights = {name: s.get("weight", 1.0) for name, s in report.sources.items()}
    try:
        _, eval_rows, _ = split_and_weight(table, weights, cfg.eval.holdout_records, cfg.seed)
    except DataError as err:  # the audit shows what training would stop on, and goes on
        return f"probes: none ({err})"
    probes = build_probes(cfg, EncodedSet(table, eval_rows), tokenizer)
    if not probes:
        return "probes: none (eval.probes.num=0)"
    origin = cfg.eval.probes.path or ("the demo's probe set" if probes[0].messages else "held-out conversations")
    lines = [f"probes: {len(probes)} from {origin}, up to {cfg.eval.probes.max_new_tokens} new tokens each"]
    for probe in probes:
        prompt = probe.messages[-1]["content"] if probe.messages else tokenizer.decode(probe.prompt_ids[-40:])
        checks = ", ".join(f"{k}={json.dumps(v)}" for k, v in probe.checks.items())
        lines.append(f"  {probe.id}: {checks}\n    prompt ends: {' '.join(prompt.split())[-100:]!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sftdist-inspect",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", nargs="*", help="a prepared directory, or sftdist-train overrides (key=value ...)")
    parser.add_argument("--samples", type=int, default=3, help="samples to show (default 3)")
    parser.add_argument("--source", default=None, help="only this source")
    parser.add_argument("--audit-records", type=int, default=500, help="records per source for the role audit")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    args = parser.parse_args(argv)
    setup_logging()
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    from hydra.errors import HydraException

    try:
        print(inspect_data(args.target, args.samples, args.source, color, args.audit_records))
    except HydraException as err:
        fail("sftdist-inspect", "config error", err)
    except (InputError, FileNotFoundError) as err:
        fail("sftdist-inspect", "error", err)


if __name__ == "__main__":
    main()
