"""Records/s of data preparation: sftdist (read + validate + filter + render + tokenize + assistant masks)
side by side with TRL's SFTTrainer dataset preparation (its plain conversational path: render + tokenize,
no assistant mask, since TRL refuses to mask these templates) on the same tokenizer and chat template.

    .venv/bin/pip install -c requirements.lock -e '.[bench]'   # trl (not a dependency of sftdist)
    .venv/bin/python tests/bench/bench_encode.py [--repeat 2]

The tokenizer is an 8k-vocab byte-level BPE trained here on the three files, with the Qwen2.5 template
(it renders tools, tool calls and tool results) and its special tokens. Each figure is the best of
``--repeat`` runs, interleaved; the cache is off for sftdist, so every run does all the work. "tokenize only" is one
batch tokenization of the rendered texts on all cores: the ceiling of any preparation of the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared"
FILES = ["alpaca_en_demo.json", "glaive_toolcall_en_demo.json", "gsm8k_train_alpaca.json"]
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.dumps(r) for f in FILES for r in json.loads((SHARED / "data" / f).read_text())]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=8192,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    template = (SHARED / "chat_templates" / "qwen2.5-instruct.jinja").read_text().strip()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template
    )


def time_sftdist(path: Path, tokenizer, num_proc: int) -> tuple[float, int]:
    from sftdist.config import DataConfig
    from sftdist.data.pipeline import prepare

    start = time.perf_counter()
    _, report = prepare(
        DataConfig(path=str(path), cache=False, num_proc=num_proc, max_length=32768, max_rejected_fraction=1.0),
        tokenizer,
        tokenizer.chat_template,
        seed=0,
    )
    return time.perf_counter() - start, report.records_in


def time_tokenize_only(path: Path, tokenizer) -> float:
    """The floor under any preparation: one batch tokenization (all cores) of the rendered texts."""
    dataset = trl_dataset(path)
    texts = [
        tokenizer.apply_chat_template(
            list(r["messages"]), tools=json.loads(r["tools"]) if r["tools"] else None, tokenize=False
        )
        for r in dataset
    ]
    start = time.perf_counter()
    tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return time.perf_counter() - start


def trl_dataset(path: Path):
    """The same records as TRL's conversational input (role/content messages, tools as a JSON string)."""
    import datasets

    from sftdist.data.formats import detect_format, normalise

    raw = json.loads(path.read_text())
    fmt = detect_format(raw[0])
    rows = []
    for record in raw:
        conv = normalise(record, fmt)
        messages = [
            {"role": m["role"], "content": m["content"] or json.dumps([c["function"] for c in m["tool_calls"]])}
            for m in conv["messages"]
        ]
        rows.append({"messages": messages, "tools": json.dumps(conv["tools"]) if conv["tools"] else None})
    return datasets.Dataset.from_list(rows)


def time_trl(path: Path, tokenizer, trainer, args) -> tuple[float, int]:
    dataset = trl_dataset(path)  # not timed: TRL gets the records already in its format
    start = time.perf_counter()
    trainer._prepare_dataset(dataset, tokenizer, args, packing=False, formatting_func=None, dataset_name="bench")
    return time.perf_counter() - start, len(dataset)


def make_trl_trainer(tokenizer, out: str):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    args = SFTConfig(
        output_dir=out, report_to=[], max_length=None, packing=False, dataset_num_proc=None, bf16=False, use_cpu=True
    )
    tiny = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    )
    return SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tokenizer), args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as out:
        trainer, trl_args = make_trl_trainer(tokenizer, out)
        print(
            f"{'file':<30} {'records':>7} {'sftdist 1 proc':>15} {'sftdist 2 proc':>15} {'TRL':>10} {'ratio':>7} "
            f"{'tokenize only':>14}"
        )
        for name in FILES:
            path = SHARED / "data" / name
            runs: dict[str, list[float]] = {"ours1": [], "ours2": [], "theirs": [], "floor": []}
            for _ in range(args.repeat):  # interleaved, so that a busy spell of the machine hits every column alike
                runs["ours1"].append(time_sftdist(path, tokenizer, 1)[0])
                runs["ours2"].append(time_sftdist(path, tokenizer, 2)[0])
                seconds, n = time_trl(path, tokenizer, trainer, trl_args)
                runs["theirs"].append(seconds)
                runs["floor"].append(time_tokenize_only(path, tokenizer))
            ours1, ours2, theirs, floor = (min(runs[k]) for k in ("ours1", "ours2", "theirs", "floor"))
            best = max(n / ours1, n / ours2)
            print(
                f"{name:<30} {n:>7} {n / ours1:>12.0f}/s {n / ours2:>12.0f}/s {n / theirs:>7.0f}/s "
                f"{best / (n / theirs):>6.2f}x {n / floor:>11.0f}/s",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
