"""Answer extraction (rocket.data.answers): where each format puts the answer, option labels read
from the question (letters or digits), the `auto` extractor, and golds checked with their file and line."""
import copy
import json

import pytest

from rocket.data.answers import answer_key, extract_choice, extract_exact, extract_number, option_labels
from rocket.data.examples import DataError, load_examples, where
from rocket.errors import RocketError
from tests.conftest import DATA

GSM8K_GOLD = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
              "altogether in April and May.\n#### 72")


@pytest.mark.parametrize("text, want", [
    ("The answer is 72. Natalia sold 48/2 = 24 clips in May, so 48 + 24 = 72 in all.", "72"),  # answer first
    ("72. Natalia sold 48/2 = 24 clips in May and 48 in April.", "72"),
    ("72 clips: she sold 48 in April and 24 in May.", "72"),
    (GSM8K_GOLD, "72"),
    ("She sold 48 + 24 clips.\n#### 1,234", "1234"),
    ("the answer is $1,234.50.", "1234.5"),                       # lowercase, dollars, trailing period
    ("So the final answer is: 3.0", "3"),
    ("In April she sold 48, in May 48/2 = 24, so 72 altogether.", "72"),  # rationale first: the last number
    ("48/2 = 24 clips in May; 72 in total", "72"),                 # a leading sum is no answer
    ("1,234 + 5 = 1,239", "1239"),
    ("x = -3.5", "-3.5"),
    ("no digits here", None),
])
def test_number_reads_where_the_format_puts_it(text, want):
    assert extract_number(text) == want


@pytest.mark.parametrize("text, want", [
    ("B. The refrigerator door contains iron, which magnets stick to. A is wrong because", "B"),
    ("(C) Organelles are like organs: each does one job.", "C"),
    ("C) organelles", "C"),
    ("D", "D"),
    ("A.", "A"),
    ("A good choice is B", "B"),                                     # 'A' is the article here
    ("A plant needs light, so D is right.", "D"),
    ("Rubbing dry palms makes the most heat. The answer is (A).", "A"),
    ("Let me think. Answer: B", "B"),
    ("the answer is c.", "C"),                                      # lowercase
    ("the correct option is d", "D"),
    ("the answer is a bit unclear", None),                           # 'a' runs into a word: no option
    ("Magnets stick to iron.\n#### B", "B"),
    ("E", None),                                                     # not an option of ABCD
])
def test_choice_reads_where_the_format_puts_it(text, want):
    assert extract_choice(text, "ABCD") == want


@pytest.mark.parametrize("text, want", [
    ("2. bubbles when acid is placed on it", "2"),
    ("The answer is 3, since streak is a physical property.", "3"),
    ("(4) reflects light", "4"),
    ("B", None),                                                      # letters are no labels of this question
    ("3 is right", None),                                             # a digit without the format is no answer
])
def test_choice_with_digit_labels(text, want):
    assert extract_choice(text, "1234") == want


def test_exact_strips_and_refuses_empty():
    assert extract_exact("  Paris \n") == "Paris" and extract_exact(" \n") is None


def test_option_labels_from_real_arc_questions():
    rows = load_examples(DATA / "arc-c_50shot.jsonl")
    labels = [option_labels(r["instruction"] + "\n" + r["input"]) for r in rows]
    assert labels[16] == "1234" and rows.places[16].endswith("arc-c_50shot.jsonl:17")
    assert all(lab == "ABCD" for i, lab in enumerate(labels) if i != 16)
    assert option_labels("What is 3.5 + 1. Explain.") is None
    assert option_labels("Pick one: (A) red (B) blue (C) green") == "ABC"
    assert option_labels("Steps: 1. mix 2. bake. Which is true? A. hot\nB. cold") == "AB"  # the later run


def test_auto_picks_the_extractor_from_the_golds():
    arc = load_examples(DATA / "arc-c_50shot.jsonl")
    key = answer_key(arc)
    assert (key.extractor, key.auto) == ("choice", True)
    assert key.golds[16] == "2" and key.golds[0] == "A"
    assert key.correct(16, "2. bubbles when acid is placed on it") and not key.correct(16, "B. bubbles")
    assert key.correct(0, "The answer is (A): dry palms") and not key.correct(0, "A good choice is B")
    gsm = [{"instruction": "How many clips?", "input": "", "output": GSM8K_GOLD},
           {"instruction": "How much?", "input": "", "output": "The answer is 1,234. She earned 1,000 + 234."}]
    key = answer_key(gsm)
    assert key.extractor == "number" and key.golds == ["72", "1234"]
    assert key.correct(0, "She sold 24 in May, 72 in all.\n#### 72") and not key.correct(0, "#### 24")
    free = [{"instruction": "Reverse the text.", "input": "apple river", "output": "REVIR ELPPA because ..."}]
    assert answer_key(free).extractor == "exact"
    mixed = copy.deepcopy(list(arc[:3]))
    mixed[1]["output"] = "The refrigerator door contains iron."               # most golds decide: this one is named
    with pytest.raises(DataError, match=r"^example 1: the gold output 'The refrigerator.*'choice' \(options ABCD\)$"):
        answer_key(mixed)
    mixed[2]["output"] = "Crustal plates converged."
    assert answer_key(mixed).extractor == "exact"
    assert answer_key(arc, "exact").auto is False


def test_unreadable_gold_names_file_and_line(tmp_path):
    rows = [json.loads(line) for line in (DATA / "arc-c_50shot.jsonl").read_text().splitlines()]
    rows[16]["output"] = "bubbles when acid is placed on it"                  # no option 1-4 named
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[10:]))
    examples = load_examples(bad)
    with pytest.raises(DataError, match=rf"^{bad}:18: the gold output 'bubbles when .*'choice' \(options 1234\)$"):
        answer_key(examples, "choice")
    with pytest.raises(DataError, match=r"^example 16: .*extractor 'choice'"):           # no file: the index
        answer_key(list(examples), "choice")
    with pytest.raises(DataError, match=rf"^{bad}:1: the gold output 'A. dry palms' has no answer for extractor "
                                        "'number'$"):
        answer_key(examples, "number")
    with pytest.raises(DataError, match=r"^example 0: accuracy needs the gold 'output'"):
        answer_key([object()])
    with pytest.raises(RocketError, match="unknown accuracy extractor 'regex'"):
        answer_key(examples, "regex")


def test_examples_remember_their_lines(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text('\n{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n')
    examples = load_examples(path)
    assert examples == [dict(instruction="a", input="", output="b"), dict(instruction="c", input="", output="d")]
    assert [where(examples, i) for i in range(2)] == [f"{path}:2", f"{path}:4"]
    assert where(copy.deepcopy(examples), 1) == f"{path}:4" and where(examples[1:], 0) == "example 0"
