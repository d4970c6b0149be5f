"""Peak host memory per rank while a ~0.5B model is set up on 2 processes (CPU, gloo): built whole on every rank
and then sharded (how sftdist did it before issue 13: "whole"), against built without weights and loaded shard by
shard (fsdp2: meta device) or partitioned as it is built (zero3: deepspeed.zero.Init) ("lean", today's path).

    .venv/bin/python tests/bench/bench_init_memory.py [--layers 28] [--strategies fsdp2,zero3]

The model is a random Llama (hidden 1280, 28 layers, MLP 3584, 10 heads / 2 KV heads, the demo tokenizer: 0.52B
parameters) saved once as an fp32 safetensors directory (2.1 GB) under --work. Each measurement is one torchrun launch
of 2 processes that set up a Trainer (data, model, strategy, no step) and report their peak resident memory
(VmHWM) above the bare interpreter's (torch and transformers imported): once the model is built and loaded, sharded
or partitioned (the figure compared; for zero3, before deepspeed.initialize), once the strategy has set it up (for
zero3, DeepSpeed's engine adds its fp32 master partitions and gradient buffers), and at the end of the Trainer's
set-up (after a first forward, which checks the loss implementation: DeepSpeed then keeps gathered parameters live
up to its stage3_max_live_parameters). One JSON line per
strategy and path, then the ratios. "one full copy" is the model's fp32 size.

glibc keeps memory that FSDP2's many small CPU all-gathers (gloo) freed in its per-thread arenas, which inflates
resident memory on CPU by up to a model's size without any tensor holding it; the processes therefore run with
MALLOC_MMAP_THRESHOLD_=1048576 (blocks over 1 MiB mapped and returned when freed), so that the figure is the memory
the tensors need. ``--default-malloc`` measures with glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def make_model(directory: Path, layers: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftdist.data.demo import load_demo_tokenizer

    tokenizer = load_demo_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1280,
        intermediate_size=3584,
        num_hidden_layers=layers,
        num_attention_heads=10,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if not (directory / "model.safetensors").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def measure(model_dir: str, strategy: str, path: str, work: str) -> None:
    """Under torchrun: set up a Trainer and print this rank's figures."""
    import torch  # noqa: F401 - the interpreter's own footprint, before the model
    import transformers  # noqa: F401

    baseline = _status("VmRSS")
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import compose
    from sftdist.training import Trainer

    if path == "whole":  # what every rank did before: the whole model built (and loaded) here, then sharded
        import sftdist.parallel.deepspeed as ds_module
        import sftdist.parallel.fsdp2 as fsdp2_module

        whole = {"loads_weights": False, "constructing": lambda self: contextlib.nullcontext()}
        for module, name in ((fsdp2_module, "FSDP2Strategy"), (ds_module, "ZeRO3Strategy")):
            setattr(module, name, type(name, (getattr(module, name),), whole))
    import sftdist.training.runner

    model_ready = {}
    choose = sftdist.training.runner.ModelRunner.choose_loss_impl

    def peak_then_choose(self, first_sample):  # the first thing after the strategy's set-up: the model is built,
        model_ready["peak"] = _status("VmHWM")  # loaded, sharded
        return choose(self, first_sample)

    sftdist.training.runner.ModelRunner.choose_loss_impl = peak_then_choose
    if strategy == "zero3":  # also before DeepSpeed's engine adds its own copies (fp32 masters, gradient partitions)
        import deepspeed

        initialize = deepspeed.initialize

        def peak_then_initialize(*args, **kwargs):
            model_ready["before_engine"] = _status("VmHWM")
            return initialize(*args, **kwargs)

        deepspeed.initialize = peak_then_initialize
    trainer = Trainer(
        compose(
            f"model.name_or_path={model_dir}",
            f"strategy={strategy}",
            f"output_dir={work}/run-{strategy}-{path}",
            "data.demo_size=200",
            "data.max_length=256",
            "train.micro_batch_tokens=512",
            "eval.every_steps=0",
            "wandb.mode=disabled",
            f"data.cache_dir={work}/cache",
        )
    )
    figures = {"rank": trainer.strategy.rank, "model_peak": model_ready["peak"], "peak": _status("VmHWM")}
    if "before_engine" in model_ready:
        figures["before_engine_peak"] = model_ready["before_engine"]
    print(json.dumps({**figures, "baseline": baseline}), flush=True)
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--strategies", default="fsdp2,zero3")
    parser.add_argument("--work", default="/tmp/sftdist-bench-init")
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # internal: MODEL_DIR STRATEGY PATH
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure, args.work)
        return
    work = Path(args.work)
    model_dir = work / f"llama-{args.layers}l"
    params = make_model(model_dir, args.layers)
    full_copy = params * 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    figures = {}
    for strategy in args.strategies.split(","):
        for path in ("whole", "lean"):
            out = subprocess.run(
                [*torchrun, __file__, "--work", str(work), "--measure", str(model_dir), strategy, path],
                env=env,
                capture_output=True,
                text=True,
            )
            ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')]
            if out.returncode or len(ranks) != 2:
                print(
                    json.dumps(
                        {"bench": "init_memory", "strategy": strategy, "path": path, "error": out.stderr[-2000:]}
                    )
                )
                continue
            peak = max(r["peak"] - r["baseline"] for r in ranks)
            model_peak = max(r["model_peak"] - r["baseline"] for r in ranks)
            built = max(r.get("before_engine_peak", r["model_peak"]) - r["baseline"] for r in ranks)
            figures[strategy, path] = built
            print(
                json.dumps(
                    {
                        "bench": "init_memory",
                        "strategy": strategy,
                        "path": path,
                        "parameters": params,
                        "malloc": "default" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=1048576",
                        "full_copy_gib": full_copy / 2**30,
                        "model_built_peak_per_rank_gib": built / 2**30,
                        "model_setup_peak_per_rank_gib": model_peak / 2**30,
                        "trainer_setup_peak_per_rank_gib": peak / 2**30,
                        "ranks": ranks,
                    }
                ),
                flush=True,
            )
        if (strategy, "whole") in figures and (strategy, "lean") in figures:
            print(
                json.dumps(
                    {
                        "bench": "init_memory",
                        "strategy": strategy,
                        "lean_over_whole": figures[strategy, "lean"] / figures[strategy, "whole"],
                        "lean_over_full_copy": figures[strategy, "lean"] / full_copy,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
