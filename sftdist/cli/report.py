"""``sftdist-report RUN_DIR [RUN_DIR ...] [--out DIR]``: plots of a run (or of several, overlaid) and one
self-contained HTML page.

    sftdist-report outputs/sft                      # -> outputs/sft/report/*.png and report.html
    sftdist-report runs/a runs/b --out compare/     # two runs on the same axes

Each plot is a PNG over the training steps: train and eval loss (with every eval set), format pass rate, repetition
rate, EOS rate, tokens/s, learning rate, gradient norm, packing efficiency and, with a curriculum, the bucket fractions
of each step with the phases shaded. A run that was stopped and resumed is one run (metrics.jsonl keeps one row per
step). A plot none of the runs has data for is not drawn (and said so). ``report.html`` holds every plot (embedded),
each run's key figures, its data report and its latest probe answers with their checks.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdist.errors import InputError
from sftdist.run.layout import DATA_REPORT_FILE, METRICS_FILE, PROBES_FILE

# (file, title, y label, [(metric key, label, style)]); "eval/*/loss" stands for every extra eval set.
LOSS = [("train/loss", "train", "-"), ("eval/loss", "eval (held out)", "o-"), ("eval/*/loss", "eval: {name}", "s--")]
FRACTIONS = [("data/frac_easy", "easy", "-"), ("data/frac_medium", "medium", "-"), ("data/frac_hard", "hard", "-")]
PLOTS: list[tuple[str, str, str, list[tuple[str, str, str]]]] = [
    ("loss", "Loss", "cross-entropy (token mean)", LOSS),
    (
        "format_pass_rate",
        "Format pass rate (probes passing every check)",
        "fraction",
        [("eval/format_pass_rate", "", "o-")],
    ),
    ("repetition_rate", "Repetition rate (repeated word n-grams)", "fraction", [("eval/repetition_rate", "", "o-")]),
    ("eos_rate", "EOS rate (answers that stopped before the limit)", "fraction", [("eval/eos_rate", "", "o-")]),
    ("tokens_per_s", "Throughput (real tokens, all ranks)", "tokens/s", [("train/tokens_per_s", "", "-")]),
    ("lr", "Learning rate", "lr", [("train/lr", "", "-")]),
    ("grad_norm", "Gradient norm (before clipping)", "norm", [("train/grad_norm", "", "-")]),
    (
        "padding_fraction",
        "Padding fraction (slots holding padding; 0 when packed)",
        "fraction",
        [("train/padding_fraction", "", "-")],
    ),
    ("curriculum", "Curriculum: bucket fractions per step", "fraction of the step", FRACTIONS),
]
FIGSIZE, DPI = (9.0, 4.5), 100  # every PNG is 900 x 450 pixels


@dataclass
class Run:
    directory: Path
    name: str
    rows: list[dict[str, Any]]
    probes: list[dict[str, Any]] = field(default_factory=list)
    data_report: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    def extra_eval_sets(self) -> list[str]:
        names = {k.split("/")[1] for r in self.rows for k in r if k.startswith("eval/") and k.endswith("/loss")}
        return sorted(n for n in names if n and n != "loss")


def load_run(directory: str | Path) -> Run:
    directory = Path(directory)
    metrics = directory / METRICS_FILE
    if not metrics.is_file():
        raise InputError(f"{directory}: no metrics.jsonl (not an sftdist run directory)")
    by_step: dict[int, dict[str, Any]] = {}
    for row in _rows(metrics):
        by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
    if not by_step:
        raise InputError(f"{metrics}: no logged step yet")
    probes_file, report_file = directory / PROBES_FILE, directory / DATA_REPORT_FILE
    probes = list(_rows(probes_file)) if probes_file.is_file() else []
    try:
        data_report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    except ValueError as err:
        raise InputError(f"{report_file}: not valid JSON ({err})") from err
    return Run(directory, directory.resolve().name, [by_step[s] for s in sorted(by_step)], probes, data_report)


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a run's JSON-lines file; a row cut short by a kill (the file's last) is left out."""
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            yield row


def plot(runs: list[Run], name: str, title: str, ylabel: str, series: list[tuple[str, str, str]], out: Path) -> bool:
    """One PNG of ``series`` over the steps, every run overlaid; False (nothing written) when no run has any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    drawn = 0
    for i, run in enumerate(runs):
        color = f"C{i}"
        expanded = [
            (key.replace("*", n), label.format(name=n), style)
            for key, label, style in series
            for n in (run.extra_eval_sets() if "*" in key else [""])
        ]
        for j, (key, label, style) in enumerate(expanded):
            steps, values = run.series(key)
            if not steps:
                continue
            if len(runs) == 1:  # one run: a color per series
                shade = f"C{j}"
            elif name == "curriculum":  # several: the buckets keep their colors, the runs differ in line style
                shade, style = f"C{j}", ("-", "--", ":", "-.")[i % 4]
            else:  # several: a color per run, the series differ in style
                shade = color
            text = " / ".join(x for x in (run.name if len(runs) > 1 else "", label) if x) or key
            axes.plot(steps, values, style, color=shade, label=text, markersize=4)
            drawn += 1
    if not drawn:
        plt.close(figure)
        return False
    if name == "curriculum":
        _shade_phases(axes, runs[0])
    if name == "loss":
        _mark_best(axes, runs)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if drawn > 1 or len(runs) > 1:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=DPI)
    plt.close(figure)
    return True


def best_step(run: Run) -> tuple[int, float] | None:
    """(step, value) of the run's best checkpoint (checkpoint.keep_best), as its last row says."""
    rows = [r for r in run.rows if "checkpoint/best_step" in r]
    return (rows[-1]["checkpoint/best_step"], rows[-1]["checkpoint/best"]) if rows else None


def _mark_best(axes: Any, runs: list[Run]) -> None:
    for i, run in enumerate(runs):
        best = best_step(run)
        if best is not None:
            label = f"best checkpoint (step {best[0]})" + (f": {run.name}" if len(runs) > 1 else "")
            axes.axvline(best[0], color=f"C{i}" if len(runs) > 1 else "k", linestyle=":", label=label)


def _shade_phases(axes: Any, run: Run) -> None:
    steps, phases = run.series("data/phase")
    start = 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or phases[i] != phases[start]:
            phase = int(phases[start])
            axes.axvspan(steps[start] - 0.5, steps[i - 1] + 0.5, color=f"C{phase + 2}", alpha=0.12, lw=0)
            axes.text((steps[start] + steps[i - 1]) / 2, 1.02, f"phase {phase}", ha="center", va="bottom", fontsize=8)
            start = i
    axes.set_ylim(0, 1.1)


def key_figures(run: Run) -> dict[str, Any]:
    """The figures a reader looks for first."""
    last = run.rows[-1]
    evals = [r for r in run.rows if "eval/loss" in r]
    probed = [r for r in run.rows if "eval/format_pass_rate" in r]
    speeds = sorted(r["train/tokens_per_s"] for r in run.rows if "train/tokens_per_s" in r)
    figures = {
        "steps": last["step"],
        "last train/loss": last.get("train/loss"),
        "best eval/loss": min(r["eval/loss"] for r in evals) if evals else None,
        "best checkpoint (checkpoint.keep_best)": "step {} ({:.4g})".format(*best_step(run))
        if best_step(run)
        else None,
        "first -> last eval/format_pass_rate": (
            f"{probed[0]['eval/format_pass_rate']:.3g} -> {probed[-1]['eval/format_pass_rate']:.3g}" if probed else None
        ),
        "last eval/eos_rate": probed[-1].get("eval/eos_rate") if probed else None,
        "last eval/repetition_rate": probed[-1].get("eval/repetition_rate") if probed else None,
        "median train/tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
    }
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items() if v is not None}


def write_html(runs: list[Run], plots: list[str], out: Path) -> Path:
    """``report.html``: self-contained (the PNGs embedded), every plot, each run's figures, data report and latest
    probe answers."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>sftdist report</title>',
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;font-size:13px}"
        "pre{white-space:pre-wrap;margin:0}.pass{color:#070}.fail{color:#b00}</style></head><body>",
        f"<h1>sftdist report: {e(', '.join(r.name for r in runs))}</h1>",
    ]
    for run in runs:
        parts.append(f"<h2>{e(run.name)}</h2><p>{e(str(run.directory))}</p><table>")
        parts += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in key_figures(run).items()]
        parts.append("</table>")
        if run.data_report:
            summary = {
                k: run.data_report[k]
                for k in ("records_in", "records_used", "records_train", "records_eval", "rejected", "filtered")
                if k in run.data_report
            }
            parts.append(f"<h3>Data</h3><pre>{e(json.dumps(summary, indent=1))}</pre>")
    parts.append("<h2>Plots</h2>")
    for name in plots:
        data = base64.b64encode((out / f"{name}.png").read_bytes()).decode()
        parts.append(
            f'<figure><img id="{name}" data-file="{name}.png" alt="{name}" width="900" height="450" '
            f'src="data:image/png;base64,{data}"></figure>'
        )
    for run in runs:
        if not run.probes:
            continue
        step = max(p["step"] for p in run.probes)
        latest = [p for p in run.probes if p["step"] == step]
        parts.append(f"<h2>Probe answers of {e(run.name)} at step {step}</h2><table>")
        parts.append("<tr><th>probe</th><th>prompt (end)</th><th>response</th><th>checks</th></tr>")
        for p in latest:
            checks = " ".join(
                f'<span class="{"pass" if ok else "fail"}">{e(name)} {"&#10003;" if ok else "&#10007;"}</span>'
                for name, ok in p["checks"].items()
            )
            parts.append(
                f"<tr><td>{e(p['id'])}</td><td><pre>{e(p['prompt'][-300:])}</pre></td>"
                f"<td><pre>{e(p['response'])}</pre></td><td>{checks}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def build_report(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[Path, list[str]]:
    """Write the plots and report.html; (the output directory, the plots drawn)."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(out) if out is not None else runs[0].directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, title, ylabel, series in PLOTS:
        if plot(runs, name, title, ylabel, series, out):
            drawn.append(name)
            print(f"sftdist-report: wrote {out / f'{name}.png'}", flush=True)
        else:
            print(f"sftdist-report: no {name} plot (no run logged {', '.join(k for k, _, _ in series)})", flush=True)
    print(f"sftdist-report: wrote {write_html(runs, drawn, out)}", flush=True)
    return out, drawn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sftdist-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (output_dir of sftdist-train)")
    parser.add_argument("--out", help="where the plots and report.html go (default: RUN_DIR/report of the first)")
    args = parser.parse_args(argv)
    try:
        build_report(args.runs, args.out)
    except (InputError, OSError) as err:
        print(f"sftdist-report: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
