import json

import pytest
import torch

from rocket.data.examples import DataError, load_examples, write_jsonl
from rocket.data.templates import PromptTemplate
from rocket.data.tokenize import (IGNORE_INDEX, Tokenized, pad_batch, pad_rows, prompt_ids, tokenize_example,
                                  tokenize_examples)


def test_loads_the_real_kshot_file(kshot_examples):
    assert len(kshot_examples) == 10
    assert all(set(e) >= {"instruction", "input", "output"} for e in kshot_examples)


def test_json_array_and_missing_input(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    assert load_examples(p) == [{"instruction": "i", "output": "o", "input": ""}]


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', ":2: malformed JSON"),
    ('{"instruction": "a"}\n', ":1: missing field(s) output"),
    ('{"instruction": 3, "output": "b"}\n', "field 'instruction' must be a string"),
    ('[1, 2]', "item 0: expected a JSON object"),
    ("\n\n", "file is empty"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert message in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_write_jsonl_roundtrip(tmp_path, kshot_examples):
    out = tmp_path / "sub" / "x.jsonl"
    write_jsonl(out, kshot_examples)
    assert load_examples(out) == kshot_examples
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize("name", ["alpaca", "llama2", "mistral", "llama2_maths"])
def test_templates_use_input_variant(name):
    tpl = PromptTemplate.get(name)
    with_input = tpl.prompt({"instruction": "INS", "input": "INP"})
    without = tpl.prompt({"instruction": "INS", "input": ""})
    assert "INS" in with_input and "INP" in with_input and "INS" in without and "INP" not in without


# The reference implementation's templates/llama2.json (mistral.json is the same file), verbatim.
REFERENCE_LLAMA2 = {
    "prompt_input": "[INST] <<SYS>>\nYou are a helpful assistant. Below is an instruction that describes a task. "
                    "\nWrite a response that appropriately completes the request.\n<</SYS>>\n\n {instruction}\n{input}\n [/INST]",
    "prompt_no_input": "[INST] <<SYS>>\nYou are a helpful assistant. Below is an instruction that describes a task. "
                       "\nWrite a response that appropriately completes the request.\n<</SYS>>\n\n {instruction}\n [/INST]",
}
STEP = "Please answer the question by thinking step-by-step.\n"


@pytest.mark.parametrize("name", ["llama2", "mistral", "llama2_maths"])
def test_llama2_templates_are_the_reference_implementations_byte_for_byte(name):
    tpl = PromptTemplate.get(name)
    ex = {"instruction": "Summarize", "input": "some text"}
    step = STEP if name == "llama2_maths" else ""
    want_input = REFERENCE_LLAMA2["prompt_input"].replace("{instruction}", step + "{instruction}")
    want_plain = REFERENCE_LLAMA2["prompt_no_input"].replace("{instruction}", step + "{instruction}")
    assert tpl.prompt(ex) == want_input.format(**ex)
    assert tpl.prompt({"instruction": "Summarize", "input": ""}) == want_plain.format(instruction="Summarize")
    assert "some text\n [/INST]" in tpl.prompt(ex) and "You are a helpful assistant" in tpl.prompt(ex)


def test_template_file(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"prompt_input": "Q:{instruction}|{input}\nA:", "prompt_no_input": "Q:{instruction}\nA:"}))
    assert PromptTemplate.get(str(p)).prompt({"instruction": "x", "input": "y"}) == "Q:x|y\nA:"
    p.write_text(json.dumps({"prompt_input": "x"}))
    with pytest.raises(DataError, match="prompt_no_input"):
        PromptTemplate.get(str(p))
    with pytest.raises(DataError, match="unknown template"):
        PromptTemplate.get("nope")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_tokenisation_masks_prompt_and_appends_eos(tiny_tokenizer, kshot_examples, template):
    ex = kshot_examples[0]
    t = tokenize_example(ex, tiny_tokenizer, template)
    assert len(t.input_ids) == len(t.labels)
    assert t.labels[: t.prompt_len] == [IGNORE_INDEX] * t.prompt_len
    assert t.labels[t.prompt_len:] == t.input_ids[t.prompt_len:]
    assert t.input_ids[-1] == tiny_tokenizer.eos_token_id
    decoded = tiny_tokenizer.decode(t.input_ids[t.prompt_len:-1])
    assert decoded == ex["output"]
    assert t.input_ids[0] == tiny_tokenizer.bos_token_id


def test_overflow_policies(tiny_tokenizer, kshot_examples):
    ex = kshot_examples[0]
    full = tokenize_example(ex, tiny_tokenizer)
    limit = full.prompt_len + 2
    with pytest.raises(DataError, match=f"exceed the context of {limit}"):
        tokenize_example(ex, tiny_tokenizer, max_length=limit)
    cut = tokenize_example(ex, tiny_tokenizer, max_length=limit, overflow="truncate")
    assert len(cut.input_ids) == limit and cut.input_ids == full.input_ids[:limit]
    assert tokenize_example(ex, tiny_tokenizer, max_length=limit, overflow="drop") is None
    assert tokenize_examples([ex], tiny_tokenizer, max_length=full.prompt_len, overflow="truncate") == [None]


# Every character str.splitlines() breaks on, besides "\n": JSON leaves them unescaped.
LINE_LIKE = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_jsonl_round_trips_every_line_like_character(tmp_path):
    rows = [{"instruction": f"a{c}b", "input": c, "output": f"x{c}y"} for c in LINE_LIKE]
    write_jsonl(tmp_path / "d.jsonl", rows)
    assert load_examples(tmp_path / "d.jsonl") == rows
    # escaped in the input file too (as other writers produce it), and with Windows line ends
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\r\n" for r in rows), encoding="utf-8")
    assert load_examples(tmp_path / "e.jsonl") == rows


def test_byte_order_mark_is_accepted_and_bad_bytes_name_the_line(tmp_path):
    row = {"instruction": "é", "input": "", "output": "ü"}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode() + b"\n")
    assert load_examples(tmp_path / "bom.jsonl") == [row]
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(row).encode() + b"\n" + '{"instruction": "é"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9\)$"):
        load_examples(tmp_path / "latin1.jsonl")


def test_one_pretty_printed_object_gets_a_message_that_says_so(tmp_path):
    p = tmp_path / "one.json"
    p.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}, indent=2))
    with pytest.raises(DataError, match="one JSON object spread over several lines; expected JSONL"):
        load_examples(p)


@pytest.mark.parametrize("obj, message", [
    ({"adapters": ["a", "b"], "loss": [[0.1, 0.2], [0.3]]}, r"'loss' row 1 \('b'\) has 1 values, row 0 has 2"),
    ({"adapters": ["a", "b"], "loss": [[0.1]]}, "one row per adapter"),
    ({"adapters": ["a"], "loss": [[0.1, "x"]]}, "non-finite or non-numeric"),
    ([1, 2], "expected a JSON object"),
])
def test_scores_files_that_do_not_fit_give_one_line(tmp_path, obj, message):
    from rocket.data.scores import Scores
    p = tmp_path / "scores.json"
    p.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=message):
        Scores.load(p)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_rows_gathers_any_rows_of_a_flat_buffer(side):
    """Rows picked out of a flat id buffer in any order (odd lengths, an empty one) equal a padded copy
    made row by row."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 0, 13, 1, 7])
    flat = torch.randint(10, 1000, (int(lengths.sum()),), generator=g)
    starts = torch.cumsum(lengths, 0) - lengths
    pick = torch.tensor([2, 0, 4, 1, 3, 2])
    ids, mask = pad_rows(flat, lengths[pick], starts[pick], 17, -7, side)
    assert ids.shape == mask.shape == (6, 17) and mask.dtype == torch.long
    for row, i in enumerate(pick.tolist()):
        n, want = int(lengths[i]), flat[int(starts[i]):int(starts[i] + lengths[i])].tolist()
        pad = [-7] * (17 - n)
        assert ids[row].tolist() == (want + pad if side == "right" else pad + want)
        assert mask[row].tolist() == ([1] * n + [0] * (17 - n) if side == "right" else [0] * (17 - n) + [1] * n)
    with pytest.raises(ValueError, match="side must be"):
        pad_rows(flat, lengths, starts, 17, 0, "middle")


def test_pad_batch_pads_right_for_training_and_left_for_generation(tiny_tokenizer, kshot_examples):
    rows = tokenize_examples(kshot_examples[:2], tiny_tokenizer)
    a, b = (len(t.input_ids) for t in rows)
    assert a != b
    L = 8 * -(-max(a, b) // 8)
    right, left = pad_batch(rows, 3, multiple=8), pad_batch(rows, 3, multiple=8, side="left")
    for k, t in enumerate(rows):
        n = len(t.input_ids)
        assert right["input_ids"][k, :n].tolist() == t.input_ids and set(right["input_ids"][k, n:].tolist()) <= {3}
        assert left["input_ids"][k, L - n:].tolist() == t.input_ids and set(left["input_ids"][k, :L - n].tolist()) <= {3}
        assert left["labels"][k, L - n:].tolist() == t.labels and left["attention_mask"][k].sum() == n
        assert right["attention_mask"][k, :n].all() and not right["attention_mask"][k, n:].any()
        assert left["attention_mask"][k, L - n:].all() and not left["attention_mask"][k, :L - n].any()
    assert right["input_ids"].shape == left["input_ids"].shape == (2, L)
    assert (right["n_input"], right["n_target"]) == (left["n_input"], left["n_target"]) == (a + b, sum(
        sum(x != IGNORE_INDEX for x in t.labels) for t in rows))
    with pytest.raises(ValueError, match="side must be"):
        pad_batch(rows, 3, side="middle")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_prompt_ids_are_the_tokenised_prompt(tiny_tokenizer, kshot_examples, template):
    t = tokenize_example(kshot_examples[0], tiny_tokenizer, template)
    ids = prompt_ids(kshot_examples[0], tiny_tokenizer, template)
    assert ids == t.input_ids[:t.prompt_len] and ids[0] == tiny_tokenizer.bos_token_id
    only = Tokenized.prompt_only(ids)
    assert only.input_ids == ids and only.labels == [IGNORE_INDEX] * len(ids) and only.prompt_len == len(ids)
