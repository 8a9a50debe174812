"""Examples in the seed's schema: JSONL/JSON I/O, prompt templates, tokenisation with label masks."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rocket.errors import RocketError

IGNORE_INDEX = -100
FIELDS = ("instruction", "input", "output")


class DataError(RocketError):
    """Malformed or unusable example data; the message names the file and line."""


# --------------------------------------------------------------------------- I/O
def _check_example(obj, where: str, require_output: bool) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    needed = FIELDS if require_output else FIELDS[:2]
    missing = [f for f in needed if f not in obj and f != "input"]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    ex = dict(obj)
    ex.setdefault("input", "")
    for f in needed:
        if not isinstance(ex.get(f), str):
            raise DataError(f"{where}: field '{f}' must be a string, got {type(ex.get(f)).__name__}")
    return ex


def load_examples(path: str | os.PathLike, require_output: bool = True) -> list[dict]:
    """Read examples from JSONL (one object per line) or a JSON array file.

    Every object needs `instruction` and `output` (strings); `input` may be absent or empty.
    Errors name the file and line: malformed JSON, missing fields, wrong types, an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        examples = [_check_example(o, f"{path}: item {i}", require_output) for i, o in enumerate(items)]
    else:
        examples = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            examples.append(_check_example(obj, f"{path}:{lineno}", require_output))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write rows as JSONL atomically: the file appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- prompt templates
_ALPACA = {
    "prompt_input": ("Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "prompt_no_input": ("Below is an instruction that describes a task. Write a response that "
                        "appropriately completes the request.\n\n"
                        "### Instruction:\n{instruction}\n\n### Response:\n"),
}
_LLAMA2 = {
    "prompt_input": "[INST] <<SYS>>\n{input}\n<</SYS>>\n\n{instruction} [/INST] ",
    "prompt_no_input": "[INST] {instruction} [/INST] ",
}
_MISTRAL = {
    "prompt_input": "[INST] {instruction}\n\n{input} [/INST]",
    "prompt_no_input": "[INST] {instruction} [/INST]",
}
TEMPLATES = {"alpaca": _ALPACA, "llama2": _LLAMA2, "mistral": _MISTRAL}


@dataclass(frozen=True)
class PromptTemplate:
    """Builds the prompt of an example; `chat` defers to the tokenizer's chat template."""
    name: str
    prompt_input: str = ""
    prompt_no_input: str = ""

    @classmethod
    def get(cls, spec: "str | PromptTemplate") -> "PromptTemplate":
        if isinstance(spec, PromptTemplate):
            return spec
        if spec == "chat":
            return cls("chat")
        if spec in TEMPLATES:
            return cls(spec, **TEMPLATES[spec])
        path = Path(spec)
        if path.suffix == ".json" and path.is_file():
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed template JSON ({e.msg})") from None
            for key in ("prompt_input", "prompt_no_input"):
                if not isinstance(obj.get(key), str):
                    raise DataError(f"{path}: template needs string field '{key}'")
            return cls(path.stem, obj["prompt_input"], obj["prompt_no_input"])
        raise DataError(f"unknown template {spec!r}: use alpaca, llama2, mistral, chat or a .json file")

    def prompt(self, example: dict, tokenizer=None) -> str:
        instruction, inp = example["instruction"], example.get("input", "")
        if self.name == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise DataError("template 'chat' needs a tokenizer with a chat_template")
            content = instruction if not inp else f"{instruction}\n\n{inp}"
            return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                 tokenize=False, add_generation_prompt=True)
        fmt = self.prompt_input if inp else self.prompt_no_input
        return fmt.format(instruction=instruction, input=inp)


# --------------------------------------------------------------------------- tokenisation
@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]          # IGNORE_INDEX on the prompt; output tokens + EOS otherwise
    prompt_len: int


def tokenize_example(example: dict, tokenizer, template="alpaca", max_length: int | None = None,
                     overflow: str = "error", where: str = "example") -> Tokenized | None:
    """Prompt tokens (masked with -100) followed by output tokens and EOS.

    overflow: what to do when the example exceeds max_length: 'error' (clear error), 'truncate'
    (cut from the end; None if no output token is left), or 'drop' (return None).
    """
    tpl = PromptTemplate.get(template)
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token_id: rocket appends EOS to every output")
    prompt = tpl.prompt(example, tokenizer)
    add_special = tpl.name != "chat"  # a chat template already writes BOS
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    output_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + output_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + output_ids
    if max_length is not None and len(ids) > max_length:
        if overflow == "error":
            raise DataError(f"{where}: {len(ids)} tokens exceed the context of {max_length}")
        if overflow == "drop" or len(prompt_ids) >= max_length:
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(ids, labels, len(prompt_ids))


def tokenize_examples(examples, tokenizer, template="alpaca", max_length=None, overflow="error"):
    """Tokenise a list of examples; items dropped by `overflow` come back as None."""
    return [tokenize_example(ex, tokenizer, template, max_length, overflow, where=f"example {i}")
            for i, ex in enumerate(examples)]


def example_text(example: dict) -> str:
    """The text embedded for data selection: instruction + input + output."""
    parts = (example.get("instruction", ""), example.get("input", ""), example.get("output", ""))
    return "\n".join(p for p in parts if p)
