"""Answers in texts: the option labels a question lists, the extractors that read an answer out of a
gold or generated output, and the answer key of a K-shot set (docs/design.md, 'Accuracy').

Every extractor first looks where the formats put the answer — a leading option or number
(answer-then-rationale outputs), GSM8K's `#### X`, `The answer is X` — and only then falls back to
a looser reading. `auto` picks the extractor from the golds, reading them by format only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

from rocket.errors import DataError, RocketError
from rocket.data.examples import where


# Generation budget of accuracy: answer-first outputs need a few tokens, but rationale-first ones
# (GSM8K's `#### X`, a chain of thought ending in "The answer is X") state the answer after a
# rationale of ~100–200 tokens; 256 covers that (lm-evaluation-harness's default budget too).
DEFAULT_MAX_NEW_TOKENS = 256

LETTERS = "ABCDE"  # the labels of `choice` when a question lists no options of its own

# An option marker in a question: `A.` `A)` `(A)` `1.` `1)`, then a space and text.
_OPTION = re.compile(r"(?<![\w.])\(?([A-J]|[1-9])[.)]\s+\S")


def option_labels(question: str) -> str | None:
    """The labels of the options a question lists, in order ('ABCD', '1234'), or None when it lists
    fewer than two. A run is A, B, C, … (or 1, 2, 3, …) in order of appearance; when both exist,
    the one ending last (nearest the answer slot) wins."""
    found = [(m.group(1), m.end()) for m in _OPTION.finditer(question)]
    best = None
    for first in "A1":
        run, end = "", -1
        for label, pos in found:
            if label == chr(ord(first) + len(run)):
                run, end = run + label, pos
        if len(run) >= 2 and (best is None or end > best[1]):
            best = (run, end)
    return best[0] if best else None


# --------------------------------------------------------------------------- choice
@lru_cache(maxsize=64)
def _choice_rules(labels: str):
    lab = f"[{re.escape(labels)}{re.escape(labels.lower())}]"
    leading = re.compile(rf"^\s*\(?({lab})(?:[.):]|\s*$)")
    gsm = re.compile(rf"####\s*\(?({lab})(?!\w)")
    cue = re.compile(rf"\b(?:answer|choice|option)\s*(?:is|:|=)\s*:?\s*(?:option\s+|choice\s+)?\(?({lab})(?!\w)",
                     re.IGNORECASE)
    loose = re.compile(rf"(?<!\w)\(?([{re.escape(labels)}])\)?(?!\w)") if labels.isalpha() else None
    return (leading, gsm, cue), loose


def _first_label(pattern, text: str) -> str | None:
    """The first match whose label is not a lowercase letter running into a word ('the answer is a
    bit…'), upper-cased."""
    for m in pattern.finditer(text):
        label = m.group(1)
        if label.islower() and re.match(r"\s+\w", text[m.end(1):]):
            continue
        return label.upper()
    return None


def choice_by_format(text: str, labels: str = LETTERS) -> str | None:
    """The option a text names where the formats put it: a leading option (`B.`, `(B)`, `B)`, a
    lone `B`), `#### B`, or `the answer/choice/option is (B)` / `Answer: B`; case-insensitive."""
    for rule in _choice_rules(labels)[0]:
        label = _first_label(rule, text)
        if label is not None:
            return label
    return None


def extract_choice(text: str, labels: str = LETTERS) -> str | None:
    """choice_by_format, then (letter labels only) the first standalone capital label that is not
    the article 'A' ('A good choice is B' → B)."""
    label = choice_by_format(text, labels)
    loose = _choice_rules(labels)[1]
    if label is not None or loose is None:
        return label
    for m in loose.finditer(text):
        if not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end(1):])):
            return m.group(1)
    return None


# --------------------------------------------------------------------------- number
_NUM = r"(?:(?<!\d)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = re.compile(_NUM)
_NUMBER_RULES = (
    re.compile(rf"####[\s$*]*({_NUM})"),
    re.compile(rf"\banswer\s*(?:is|:|=)[\s:$*(]*({_NUM})", re.IGNORECASE),
    re.compile(rf"^[\s$*]*({_NUM})(?!\s*[-+*/×÷=^]|\d|[.,]\d)"),  # a leading number, not a leading sum
)


def _normalise(raw: str) -> str:
    value = float(raw.replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


def number_by_format(text: str) -> str | None:
    """The number a text states where the formats put it: `#### 72`, `the answer is 72`, or a
    leading number (answer-first outputs); commas removed, '3.0' → '3'."""
    for rule in _NUMBER_RULES:
        m = rule.search(text)
        if m:
            return _normalise(m.group(1))
    return None


def extract_number(text: str) -> str | None:
    """number_by_format, then the last number of the text (a rationale ending in its result)."""
    found = number_by_format(text)
    if found is not None:
        return found
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def extract_exact(text: str) -> str | None:
    """The stripped text (None when empty)."""
    return text.strip() or None


EXTRACTORS = {"choice": extract_choice, "number": extract_number, "exact": extract_exact}


def get_extractor(name: str):
    if name not in EXTRACTORS:
        raise RocketError(f"unknown accuracy extractor {name!r}: use auto, {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]


# --------------------------------------------------------------------------- the answer key
@dataclass
class AnswerKey:
    """What accuracy compares: per example a reader (text → answer or None) and the gold answer."""
    extractor: str                                  # the extractor that runs: choice, number or exact
    auto: bool                                      # picked by `auto` from the golds
    reason: str                                     # why it was picked (for the log)
    readers: list[Callable[[str], str | None]]
    golds: list[str]

    def correct(self, i: int, text: str) -> bool:
        return self.readers[i](text) == self.golds[i]


def _auto(outputs: list[str], labels: list[str | None]) -> tuple[str, str]:
    """Most golds decide (every gold is then checked against the pick, so a stray one is named)."""
    def most(found) -> bool:
        return 2 * sum(x is not None for x in found) > len(outputs)

    if all(lab is not None for lab in labels) and most(map(choice_by_format, outputs, labels)):
        return "choice", "the questions list options and the golds name them"
    if most(map(number_by_format, outputs)):
        return "number", "the golds state numbers ('#### X', 'the answer is X' or a leading number)"
    return "exact", "the golds are neither option labels nor stated numbers: whole outputs are compared"


def answer_key(examples, extractor: str = "auto") -> AnswerKey:
    """The extractor (`auto`: from the golds) and every gold's answer; an example without a gold
    text, or a gold the extractor cannot read, is an error naming its file and line (examples from
    rocket.data.load_examples) or its index."""
    if extractor != "auto":
        get_extractor(extractor)
    outputs, labels = [], []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("output"), str):
            raise DataError(f"{where(examples, i)}: accuracy needs the gold 'output' text of every example "
                            "(no accuracy: accuracy=None / --no-accuracy)")
        outputs.append(ex["output"])
        labels.append(option_labels(f"{ex.get('instruction', '')}\n{ex.get('input', '')}"))
    auto = extractor == "auto"
    name, reason = _auto(outputs, labels) if auto else (extractor, "given")
    readers = [partial(extract_choice, labels=lab or LETTERS) if name == "choice" else EXTRACTORS[name]
               for lab in labels]
    golds = []
    for i, (read, out, lab) in enumerate(zip(readers, outputs, labels)):
        gold = read(out)
        if gold is None:
            options = f" (options {lab or LETTERS})" if name == "choice" else ""
            raise DataError(f"{where(examples, i)}: the gold output {out[:60]!r} has no answer for extractor "
                            f"'{name}'{options}")
        golds.append(gold)
    return AnswerKey(name, auto, reason, readers, golds)
