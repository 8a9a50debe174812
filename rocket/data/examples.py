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



class Examples(list):
    """The example dicts of a file, each remembering where it came from (`file:line`, or `file: item
    i` in a JSON array), so that a later check can name the line; the dicts themselves are unchanged."""

    def __init__(self, items=(), places=()):
        super().__init__(items)
        self.places = list(places)


def where(examples, i: int) -> str:
    """Where example i came from: its file and line when `examples` was loaded from a file (and
    not sliced since), else its index."""
    return examples.places[i] if isinstance(examples, Examples) else f"example {i}"


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


def load_examples(path: str | os.PathLike, require_output: bool = True) -> Examples:
    """Read examples from JSONL (one object per line) or a JSON array file.

    Every object needs `instruction` and `output` (strings); `input` may be absent or empty.
    Errors name the file and line: malformed JSON, missing fields, wrong types, an empty file, bytes
    that are not UTF-8 (a leading byte-order mark is accepted).
    The list remembers every example's place (`where`) for checks made later.
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
        places = [f"{path}: item {i}" for i in range(len(items))]
        examples = [_check_example(o, place, require_output) for o, place in zip(items, places)]
    else:
        examples, places = [], []
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
            places.append(f"{path}:{lineno}")
            examples.append(_check_example(obj, places[-1], require_output))
    if not examples:
        raise DataError(f"{path}: no examples")
    return Examples(examples, places)


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write rows as JSONL atomically: the file appears whole or not at all."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def example_text(example: dict) -> str:
    """The text embedded for data selection: instruction + input + output."""
    parts = (example.get("instruction", ""), example.get("input", ""), example.get("output", ""))
    return "\n".join(p for p in parts if p)
