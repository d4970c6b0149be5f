"""The embedded demo: generated conversations and the bundled tokenizer that knows their template.

The conversations are arithmetic exercises in three difficulty buckets (``meta.difficulty``):

- easy: one operation, one turn;
- medium: a two-step word problem or expression, sometimes with a system prompt;
- hard: a two-step problem followed by one or two follow-up turns that build on the last answer.

Every assistant answer shows its working one line per step and ends with a line ``#### <number>``
(GSM8K's convention), so format and repetition probes have something checkable to measure.
Everything is a pure function of the seed.

The tokenizer is a byte-level BPE (digits split one by one) trained by :func:`train_demo_tokenizer`
on demo conversations and shipped in ``sftdist/assets/demo_tokenizer`` with a ChatML template;
``python -m sftdist.data.demo`` regenerates it and the demo's probe set (``sftdist/assets/demo_probes.jsonl``: demo
prompts checked for the ``#### <number>`` answer format), and a test checks that the shipped copies are what the
code produces.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEMO_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_tokenizer"
DEMO_PROBES = Path(__file__).resolve().parent.parent / "assets" / "demo_probes.jsonl"
# The demo's answer format, which its probes check: the last line is "#### <number>", then the turn ends.
DEMO_PROBE_CHECKS = {"regex": r"(^|\n)#### -?\d+\s*$", "stops": True}
_PROBE_SEED = 424242
DEMO_VOCAB_SIZE = 512  # an upper bound: the demo corpus yields ~500 tokens at min_frequency=2
# ChatML, the template family of Qwen and SmolLM: each turn is <|im_start|>ROLE\nCONTENT<|im_end|>\n.
DEMO_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
PAD_TOKEN, BOT_TOKEN, EOT_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ANSWER_PREFIX = "#### "
DIFFICULTIES = ("easy", "medium", "hard")

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena")
_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards")
_SYSTEM = (
    "You are a careful math tutor. Show each step on its own line, "
    "then give the final answer on a last line as '#### <number>'."
)
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def _answer(steps: list[tuple[int, str, int]]) -> tuple[str, int]:
    """[(a, op, b), ...] chained left to right -> ("a op b = r\\n...\\n#### r", r)."""
    lines, result = [], None
    for a, op, b in steps:
        result = _OPS[op](a, b)
        lines.append(f"{a} {op} {b} = {result}")
    lines.append(f"{ANSWER_PREFIX}{result}")
    return "\n".join(lines), result


def _easy(rng: random.Random) -> list[dict]:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(0, 50), rng.randint(0, 50))
    if op == "-" and b > a:
        a, b = b, a
    question = rng.choice(
        (
            f"What is {a} {op} {b}?",
            f"What is {a} {_OP_WORDS[op]} {b}?",
            f"Compute {a} {op} {b}.",
            f"Please calculate {a} {_OP_WORDS[op]} {b}.",
        )
    )
    text, _ = _answer([(a, op, b)])
    return [{"role": "user", "content": question}, {"role": "assistant", "content": text}]


def _two_step(rng: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(5, 40), rng.randint(1, 30)
        c = rng.randint(1, a + b)
        question = (
            f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
            f"How many {item} does {name} have now?"
        )
        return question, [(a, "+", b), (a + b, "-", c)]
    if kind == 1:
        a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(0, 20)
        question = f"A box holds {a} {item}. How many {item} are in {b} boxes and {c} loose ones?"
        return question, [(a, "*", b), (a * b, "+", c)]
    a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(2, 6)
    return f"Compute ({a} + {b}) * {c}.", [(a, "+", b), (a + b, "*", c)]


def _medium(rng: random.Random) -> list[dict]:
    question, steps = _two_step(rng)
    text, _ = _answer(steps)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": _SYSTEM})
    return messages


def _hard(rng: random.Random) -> list[dict]:
    question, steps = _two_step(rng)
    text, result = _answer(steps)
    messages = [{"role": "system", "content": _SYSTEM}] if rng.random() < 0.5 else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
    for _ in range(rng.randint(1, 2)):
        op = rng.choice("+-*")
        d = rng.randint(2, 5) if op == "*" else rng.randint(1, 25)
        follow_up = {
            "+": f"Now add {d} to that.",
            "-": f"Now take away {d} from that.",
            "*": f"Then multiply the result by {d}.",
        }[op]
        text, result = _answer([(result, op, d)])
        messages += [{"role": "user", "content": follow_up}, {"role": "assistant", "content": text}]
    return messages


_BUILDERS = {"easy": _easy, "medium": _medium, "hard": _hard}


def generate_demo_conversations(num: int, seed: int = 0) -> list[dict]:
    """``num`` distinct demo records ``{"messages": [...], "meta": {...}}``, a pure function of ``seed``.

    The buckets are drawn in equal proportions; ``meta`` carries source, task and difficulty. A draw that
    repeats an earlier conversation is drawn again, so deduplication leaves the demo whole.
    """
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < num:
        difficulty = DIFFICULTIES[rng.randrange(3)]
        messages = _BUILDERS[difficulty](rng)
        key = "\n".join(m["content"] for m in messages).lower()
        if key in seen:
            continue
        seen.add(key)
        meta = {"source": "demo", "task": "arithmetic", "difficulty": difficulty, "id": f"demo-{seed}-{len(records)}"}
        records.append({"messages": messages, "meta": meta})
    return records


def demo_probes(num: int = 16) -> list[dict]:
    """The demo's probe set: demo conversations of all three buckets up to their last answer (drawn apart from any
    training seed), each checked for the answer format (``DEMO_PROBE_CHECKS``); shipped as ``DEMO_PROBES``."""
    probes = []
    for record in generate_demo_conversations(num, seed=_PROBE_SEED):
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        difficulty = record["meta"]["difficulty"]
        probe_id = f"demo-{len(probes)}-{difficulty}"
        probes.append({"id": probe_id, "messages": messages[:last], "checks": DEMO_PROBE_CHECKS})
    return probes


def write_demo_probes(path: Path = DEMO_PROBES) -> None:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in demo_probes()), encoding="utf-8")


def train_demo_tokenizer(vocab_size: int = DEMO_VOCAB_SIZE):
    """Train the demo's byte-level BPE deterministically and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOT_TOKEN, EOT_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    corpus = [
        m["role"] + "\n" + m["content"] for r in generate_demo_conversations(4000, seed=1234) for m in r["messages"]
    ]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOT_TOKEN,  # the end of an assistant turn is where generation stops
        additional_special_tokens=[BOT_TOKEN],
        chat_template=DEMO_CHAT_TEMPLATE,
        model_max_length=2048,
    )


def load_demo_tokenizer():
    """The bundled demo tokenizer (shipped in sftdist/assets/demo_tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER_DIR))


def _main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the bundled demo tokenizer and probe set.")
    parser.add_argument("--write-tokenizer", metavar="DIR", default=str(DEMO_TOKENIZER_DIR))
    parser.add_argument("--write-probes", metavar="FILE", default=str(DEMO_PROBES))
    args = parser.parse_args()
    train_demo_tokenizer().save_pretrained(args.write_tokenizer)
    print(f"wrote the demo tokenizer to {args.write_tokenizer}")
    write_demo_probes(Path(args.write_probes))
    print(f"wrote the demo probes to {args.write_probes}")


if __name__ == "__main__":
    _main()
