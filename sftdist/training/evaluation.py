"""What an eval measures (every ``eval.every_steps``, at the last step, and before the first with
``eval.before_training``), on every rank together:

- ``eval/loss``: the token-mean cross-entropy on the held-out samples; ``eval/loss/<source>`` per source when there
  are several; ``eval/loss_<bucket>`` per difficulty bucket with a curriculum;
- ``eval/<name>/loss`` on each extra eval set (``eval.sources``: files never trained on, e.g. general chat while
  tuning on math: the forgetting monitor);
- the generation probes (:mod:`sftdist.metrics.probes`): ``eval/format_pass_rate``, ``eval/format/<check>``,
  ``eval/repetition_rate``, ``eval/distinct_2``, ``eval/eos_rate``, ``eval/response_tokens``, and one row per probe
  (its prompt, response and checks) for ``probes.jsonl`` and W&B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from sftdist.config import SFTConfig
from sftdist.curriculum.difficulty import MISSING
from sftdist.curriculum.sampler import BUCKETS
from sftdist.data.dataset import EncodedSet, Sample
from sftdist.data.demo import DEMO_PROBES
from sftdist.data.pipeline import prepare
from sftdist.data.report import DataReport
from sftdist.data.sources import source_name, uses_demo
from sftdist.data.template import IGNORE_INDEX, bind_template
from sftdist.errors import DataError
from sftdist.metrics.generation import generate_greedy
from sftdist.metrics.probes import (
    Probe,
    Response,
    check,
    default_checks,
    load_probe_file,
    opened_think,
    probe_metrics,
    reference_tools,
)

# (summed cross-entropy, supervised tokens) of some samples on this rank
LossSums = Callable[[list[Sample]], tuple[float, int]]


def build_eval_sources(
    cfg: SFTConfig, tokenizer: Any, template: str
) -> tuple[dict[str, EncodedSet], dict[str, DataReport]]:
    """The extra eval sets (``eval.sources``), prepared as training data is (validated, filtered, encoded,
    cached), by name, and each one's data report (what was rejected, filtered or truncated: for data_report.json)."""
    sets, reports = {}, {}
    for i, source in enumerate(cfg.eval.sources):
        name = source.name or source_name(source.path)
        if name in sets:
            raise DataError(f"eval.sources[{i}]: the name {name!r} is taken; give each eval set a distinct `name`")
        data = dataclasses.replace(
            cfg.data, path=source.path, format=source.format, split=source.split, sources=[], prepared=None
        )
        try:
            table, reports[name] = prepare(data, tokenizer, template, cfg.seed)
        except DataError as err:
            raise DataError(f"eval.sources[{i}] ({source.path}): {err}") from err
        sets[name] = EncodedSet(table, np.arange(len(table)))
    return sets, reports


def build_probes(cfg: SFTConfig, eval_set: EncodedSet, tokenizer: Any) -> list[Probe]:
    """The probe set: ``eval.probes.path``; for the demo, its own (``sftdist/assets/demo_probes.jsonl``); else the
    first ``eval.probes.num`` held-out conversations, checked by their reference answers."""
    p, d = cfg.eval.probes, cfg.data
    if p.num == 0:
        return []
    if p.path is not None:
        return load_probe_file(p.path)
    if uses_demo(d):
        return load_probe_file(DEMO_PROBES)
    probes = []
    for i in range(min(p.num, len(eval_set))):
        sample = eval_set[i]
        start, end = _last_answer(sample.labels)
        if start is None:
            continue
        answer = sample.input_ids[start:end]
        if answer and answer[-1] in tokenizer.all_special_ids:  # the end-of-turn marker is not part of the answer
            answer = answer[:-1]
        reference = tokenizer.decode(answer)
        probe_id = sample.meta.get("id") or f"{sample.meta.get('source', 'held-out')}:{int(eval_set.rows[i])}"
        checks = default_checks(reference, p.length_factor)
        tools = reference_tools(reference) if "tool_call" in checks else None
        probes.append(
            Probe(str(probe_id), checks, prompt_ids=sample.input_ids[:start], tools=tools, reference=reference)
        )
    return probes


def _last_answer(labels: list[int]) -> tuple[int | None, int]:
    """[start, end) of the last supervised span: the last trained answer (with its end-of-turn marker)."""
    end = next((i + 1 for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE_INDEX), None)
    if end is None:
        return None, 0
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


class Evaluator:
    """The held-out samples (with their difficulty buckets), the extra eval sets and the probes of a run."""

    def __init__(
        self,
        cfg: SFTConfig,
        eval_set: EncodedSet,
        buckets: np.ndarray | None,
        extra: dict[str, EncodedSet],
        probes: list[Probe],
        tokenizer: Any,
        template: str,
    ):
        self.cfg, self.eval_set, self.buckets, self.extra, self.probes = cfg, eval_set, buckets, extra, probes
        self.sources = np.asarray(eval_set.table.data.column("source").to_pylist(), dtype=object)[eval_set.rows]
        self.tokenizer = tokenizer
        ct = bind_template(tokenizer, template, cfg.data.chat_template_kwargs)
        self.prompts = [_prompt_ids(probe, ct, tokenizer) for probe in probes]
        self.opened = [opened_think(tokenizer.decode(prompt)) for prompt in self.prompts]

    def due(self, done_steps: int) -> bool:
        """Whether to evaluate after ``done_steps`` steps: every ``eval.every_steps``, and after the last."""
        every = self.cfg.eval.every_steps
        return bool(every) and (done_steps % every == 0 or done_steps == self.cfg.train.max_steps)

    def due_before_training(self, start_step: int) -> bool:
        """Whether to evaluate the model as it starts (``eval.before_training``, a run not resumed)."""
        return bool(self.cfg.eval.every_steps) and self.cfg.eval.before_training and start_step == 0

    def losses(self, loss_sums: LossSums, all_sum: Callable[[list[float]], list[float]]) -> dict[str, float]:
        """``eval/loss`` and its breakdowns: each held-out sample is scored once, in the part of its (source,
        bucket), and the parts are added up per metric (one all-reduce for all of them)."""
        sources = self.sources
        buckets = self.buckets if self.buckets is not None else np.full(len(sources), MISSING)
        parts = sorted(set(zip(sources.tolist(), buckets.tolist())))  # sorted: the same order on every rank
        scored = [(self.eval_set, np.flatnonzero((sources == s) & (buckets == b))) for s, b in parts]
        scored += [(data, np.arange(len(data))) for data in self.extra.values()]
        sums = all_sum([x for data, rows in scored for x in loss_sums([data[int(i)] for i in rows])])
        totals, counts = sums[0::2], sums[1::2]

        def summed(keep: Callable[[str, int], bool]) -> tuple[float, float]:
            chosen = [j for j, (s, b) in enumerate(parts) if keep(s, b)]
            return sum(totals[j] for j in chosen), sum(counts[j] for j in chosen)

        groups = {"eval/loss": summed(lambda s, b: True)}
        if len(set(sources.tolist())) > 1:
            groups |= {f"eval/loss/{name}": summed(lambda s, b, name=name: s == name) for name in sorted(set(sources))}
        if self.buckets is not None:
            groups |= {f"eval/loss_{name}": summed(lambda s, b, k=k: b == k) for k, name in enumerate(BUCKETS)}
        for j, name in enumerate(self.extra, start=len(parts)):
            groups[f"eval/{name}/loss"] = (totals[j], counts[j])
        return {key: total / count for key, (total, count) in groups.items() if count}

    def probe(
        self,
        model: torch.nn.Module,
        strategy: Any,
        stop_ids: list[int],
        pad_id: int,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager],
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The probe metrics and one row per probe (the same on every rank; a collective)."""
        if not self.probes:
            return {}, []
        p = self.cfg.eval.probes
        generated = generate_greedy(
            model,
            strategy,
            self.prompts,
            stop_ids=stop_ids,
            pad_id=pad_id,
            max_new_tokens=p.max_new_tokens,
            batch_size=p.batch_size,
            device=device,
            autocast=autocast,
        )
        responses = [
            check(probe, Response(self.tokenizer.decode(g.tokens), len(g.tokens), g.stopped, opened=opened))
            for probe, g, opened in zip(self.probes, generated, self.opened)
        ]
        rows = [
            {
                "id": probe.id,
                "prompt": self.tokenizer.decode(prompt),
                "response": r.text,
                "tokens": r.num_tokens,
                "stopped": r.stopped,
                "passed": r.passed,
                "checks": r.checks,
            }
            for probe, prompt, r in zip(self.probes, self.prompts, responses)
        ]
        return probe_metrics(self.probes, responses, p.repetition_ngram), rows


def _prompt_ids(probe: Probe, ct: Any, tokenizer: Any) -> list[int]:
    """A probe's prompt tokens: a held-out sample's own, or the messages rendered with the generation prompt
    (adapted to what the template can render, as training data is) and tokenized as training text is."""
    if probe.prompt_ids is not None:
        return list(probe.prompt_ids)
    messages, tools, _ = ct.adapt(probe.messages, probe.tools)
    try:
        text = ct.render(messages, add_generation_prompt=True, tools=tools)
    except Exception as err:  # noqa: BLE001 - the template's own refusal, named with the probe
        raise DataError(f"probe {probe.id!r}: the chat template cannot render its prompt ({err})") from err
    return tokenizer(text, add_special_tokens=False)["input_ids"]
