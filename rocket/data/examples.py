"""Examples on disk: JSONL (or a JSON array) of instruction / input / output records, read with
checks that name the file and line, written atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from rocket.errors import DataError
from rocket.io import atomic_write, read_text


FIELDS = ("instruction", "input", "output")



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


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def load_examples(path: str | os.PathLike, require_output: bool = True) -> list[dict]:
    """Read examples from JSONL (one object per line) or a JSON array file.

    Every object needs `instruction` and `output` (strings); `input` may be absent or empty.
    Errors name the file and line: malformed JSON, missing fields, wrong types, an empty file, bytes
    that are not UTF-8 (a leading byte-order mark is accepted).
    """
    path = Path(path)
    text = read_text(path, DataError)
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
        # JSONL records end at "\n" only: str.splitlines() would also split inside a record at
        # U+2028, U+2029, U+0085 and other characters that JSON leaves unescaped.
        for lineno, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if not examples and _is_one_object(text):
                    raise DataError(f"{path}: one JSON object spread over several lines; expected JSONL "
                                    "(one object per line) or a JSON array") from None
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            examples.append(_check_example(obj, f"{path}:{lineno}", require_output))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write rows as JSONL atomically: the file appears whole or not at all."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def example_text(example: dict) -> str:
    """The text embedded for data selection: instruction + input + output."""
    parts = (example.get("instruction", ""), example.get("input", ""), example.get("output", ""))
    return "\n".join(p for p in parts if p)
