"""Prompt templates: alpaca, llama2 (= mistral), llama2_maths, as the reference implementation
writes them, the tokenizer's chat template, or a JSON file."""
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
# The reference implementation's templates/llama2.json, verbatim (its mistral.json is the same
# file); llama2_maths.json adds a step-by-step request before the instruction.
_LLAMA2_SYSTEM = ("[INST] <<SYS>>\nYou are a helpful assistant. Below is an instruction that describes a task. "
                  "\nWrite a response that appropriately completes the request.\n<</SYS>>\n\n ")
_LLAMA2 = {
    "prompt_input": _LLAMA2_SYSTEM + "{instruction}\n{input}\n [/INST]",
    "prompt_no_input": _LLAMA2_SYSTEM + "{instruction}\n [/INST]",
}
_LLAMA2_MATHS = {
    "prompt_input": _LLAMA2_SYSTEM + "Please answer the question by thinking step-by-step.\n{instruction}\n{input}\n [/INST]",
    "prompt_no_input": _LLAMA2_SYSTEM + "Please answer the question by thinking step-by-step.\n{instruction}\n [/INST]",
}
TEMPLATES = {"alpaca": _ALPACA, "llama2": _LLAMA2, "mistral": _LLAMA2, "llama2_maths": _LLAMA2_MATHS}


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
        raise DataError(f"unknown template {spec!r}: use alpaca, llama2, mistral, llama2_maths, chat or a .json file")

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
