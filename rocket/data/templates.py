"""Prompt templates: alpaca, llama2, mistral, the tokenizer's chat template, or a JSON file."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from rocket.data.examples import DataError


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
