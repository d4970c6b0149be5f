"""Time, records/s and peak memory of ``sftdist-prepare`` on large synthetic data (issue 15's scale benchmark).

    .venv/bin/python tests/bench/bench_prepare_scale.py --records 200000,1000000

The records are the three shared data sets (Alpaca, Glaive tool calls, GSM8K) as one messages-format ``.jsonl``,
cycled and made distinct (each copy's first user turn ends with its copy number, so exact dedup keeps them all).
Each size is prepared by ``sftdist-prepare`` in a process of its own with SmolLM2-135M-Instruct's tokenizer (49k
vocabulary) and chat template, max length 4096 (truncate), the cache off, and the default ``data.num_proc`` (0:
every core, up to 8, on large inputs). Peak memory is sampled every 0.1 s over the whole process tree (the main
process and its encoding workers, summed) and read from the kernel for the largest single process (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
FILES = ["alpaca_en_demo.json", "glaive_toolcall_en_demo.json", "gsm8k_train_alpaca.json"]


def base_records() -> list[dict]:
    """The shared records as canonical messages (with their tool schemas)."""
    from sftdist.data.formats import Rejected, detect_format, normalise

    out = []
    for name in FILES:
        raw = json.loads((SHARED / name).read_text())
        fmt = detect_format(raw[0])
        for record in raw:
            conv = normalise(record, fmt)
            if isinstance(conv, Rejected):
                continue
            messages = [
                {k: v for k, v in m.items() if k in ("role", "content", "tool_calls")} for m in conv["messages"]
            ]
            out.append({"messages": messages, **({"tools": conv["tools"]} if conv["tools"] else {})})
    return out


def write_records(path: Path, n: int) -> int:
    """``n`` distinct records, cycled from the shared sets; returns the file's size in bytes."""
    base = base_records()
    with path.open("w") as f:
        for i in range(n):
            record = json.loads(json.dumps(base[i % len(base)]))
            first_user = next(m for m in record["messages"] if m["role"] == "user")
            first_user["content"] = f"{first_user['content']} (copy {i // len(base)})"
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path.stat().st_size


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_prepare(data: Path, out: Path, model: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "sftdist.cli.prepare",
        f"output_dir={out}",
        f"model.name_or_path={model}",
        f"data.path={data}",
        "data.max_length=4096",
        "data.truncation=truncate",
        "data.cache=false",
        "data.max_rejected_fraction=1.0",
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    watched, peak, done = psutil.Process(proc.pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(watched))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = proc.communicate()[0]
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"sftdist-prepare failed:\n{log[-4000:]}")
    report = json.loads((out / "data_report.json").read_text())
    return {
        "seconds": seconds,
        "peak_tree_rss": peak[0],
        "peak_one_process_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,  # the largest child yet
        "report": report,
        "progress_lines": [line for line in log.splitlines() if "records/s" in line][-2:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default="200000,1000000", help="comma-separated record counts")
    parser.add_argument("--workdir", default=None, help="where the data and outputs go (default: a temp dir)")
    parser.add_argument("extra", nargs="*", help="more sftdist-prepare overrides, e.g. data.num_proc=1")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_probes_smollm2 import smollm2_directory

    model = smollm2_directory()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in (int(x) for x in args.records.split(",")):
            data = Path(tmp) / f"records_{n}.jsonl"
            size = write_records(data, n)
            r = run_prepare(data, Path(tmp) / f"prepared_{n}", model, args.extra)
            rep = r["report"]
            print(
                json.dumps(
                    {
                        "records": n,
                        "input_mb": round(size / 2**20, 1),
                        "records_used": rep["records_used"],
                        "tokens": rep["num_tokens"],
                        "seconds": round(r["seconds"], 1),
                        "records_per_s": round(n / r["seconds"]),
                        "tokens_per_s": round(rep["num_tokens"] / r["seconds"]),
                        "peak_tree_rss_gib": round(r["peak_tree_rss"] / 2**30, 2),
                        "peak_one_process_rss_gib": round(r["peak_one_process_rss"] / 2**30, 2),
                        "cpus": os.cpu_count(),
                        "progress": r["progress_lines"],
                    }
                ),
                flush=True,
            )
            data.unlink()


if __name__ == "__main__":
    main()
