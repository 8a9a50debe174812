import json

import pytest

from rocket.data.examples import DataError, load_examples, write_jsonl
from rocket.data.templates import PromptTemplate
from rocket.data.tokenize import IGNORE_INDEX, Tokenized, pad_batch, prompt_ids, tokenize_example, tokenize_examples


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


@pytest.mark.parametrize("name", ["alpaca", "llama2", "mistral"])
def test_templates_use_input_variant(name):
    tpl = PromptTemplate.get(name)
    with_input = tpl.prompt({"instruction": "INS", "input": "INP"})
    without = tpl.prompt({"instruction": "INS", "input": ""})
    assert "INS" in with_input and "INP" in with_input and "INS" in without and "INP" not in without


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
