"""Rationale generation: greedy and batch-invariant, answer-then-rationale output, resumable, CLI."""
import copy
import json
from collections import Counter

import pytest
import torch

import rocket.rationale.generate as gen
from rocket.cli import main as cli_main
from rocket.data.examples import load_examples, write_jsonl
from rocket.errors import RationaleError
from rocket.rationale import RATIONALE_PROMPT, generate_rationales
from rocket.rationale.generate import SEPARATOR, partial_path, rationale_request, resolve_template

NEW = 6


@pytest.fixture
def items(kshot_examples):
    """Five K-shot items of different prompt lengths, one with an input and an extra field."""
    out = copy.deepcopy(kshot_examples[:5])
    out[1]["input"] = "Think about what the door is made of."
    out[2]["id"] = "arc-3"
    return out


def chat_prompt(tokenizer, example):
    text = tokenizer.apply_chat_template([{"role": "user", "content": rationale_request(example)}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def argmax_loop(model, ids, eos, n):
    """Greedy decoding the plain way: one unpadded row, a full forward per token."""
    new = []
    for _ in range(n):
        t = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if t in eos:
            break
        new.append(t)
    return new


def expected(tokenizer, example, tokens):
    rationale = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return {**example, "output": example["output"] + "\n" + rationale if rationale else example["output"]}


def test_batched_greedy_equals_unbatched_and_a_plain_argmax_loop(tiny_llama, tiny_tokenizer, items):
    eos = [tiny_tokenizer.eos_token_id]
    want = [expected(tiny_tokenizer, ex, argmax_loop(tiny_llama, chat_prompt(tiny_tokenizer, ex), eos, NEW))
            for ex in items]
    one = generate_rationales(tiny_llama, tiny_tokenizer, items, batch_size=1, max_new_tokens=NEW, progress=False)
    three = generate_rationales(tiny_llama, tiny_tokenizer, items, batch_size=3, max_new_tokens=NEW, progress=False)
    assert len({len(chat_prompt(tiny_tokenizer, ex)) for ex in items}) == len(items)  # padding really happens
    assert one == want and three == want


def test_stops_at_any_eos_of_the_model(tiny_llama, tiny_tokenizer, items):
    """An instruct model's own end-of-turn id (generation_config.eos_token_id) stops a row too."""
    prompts = [chat_prompt(tiny_tokenizer, ex) for ex in items]
    free = [argmax_loop(tiny_llama, p, [tiny_tokenizer.eos_token_id], NEW) for p in prompts]
    stop = Counter(t for seq in free for t in seq[1:]).most_common(1)[0][0]
    cut = [argmax_loop(tiny_llama, p, [tiny_tokenizer.eos_token_id, stop], NEW) for p in prompts]
    assert len({len(c) for c in cut}) > 1 and min(len(c) for c in cut) < NEW  # rows stop at different steps
    tiny_llama.generation_config.eos_token_id = stop
    got = generate_rationales(tiny_llama, tiny_tokenizer, items, batch_size=5, max_new_tokens=NEW, progress=False)
    assert got == [expected(tiny_tokenizer, ex, c) for ex, c in zip(items, cut)]


def test_an_empty_rationale_leaves_the_gold_answer_alone_with_a_warning(tiny_llama, tiny_tokenizer, items):
    first = argmax_loop(tiny_llama, chat_prompt(tiny_tokenizer, items[0]), [tiny_tokenizer.eos_token_id], 1)[0]
    tiny_llama.generation_config.eos_token_id = first  # item 1 ends at once
    with pytest.warns(UserWarning, match="1 of 2 rationales came back empty"):
        got = generate_rationales(tiny_llama, tiny_tokenizer, items[:2], max_new_tokens=NEW, progress=False)
    assert got[0] == items[0] and got[1]["output"].startswith(items[1]["output"] + "\n")


def test_output_is_gold_answer_then_rationale(tiny_llama, tiny_tokenizer, items, tmp_path):
    got = generate_rationales(tiny_llama, tiny_tokenizer, items, batch_size=2, max_new_tokens=NEW,
                              out=tmp_path / "cot.jsonl", progress=False)
    assert SEPARATOR == "\n"  # the reference implementation's CoT layout: "A. dry palms\n<rationale>"
    for item, ex in zip(got, items):
        assert {k: v for k, v in item.items() if k != "output"} == {k: v for k, v in ex.items() if k != "output"}
        assert item["output"].startswith(ex["output"] + "\n")
        assert item["output"][len(ex["output"]) + 1:].strip()
    assert got[2]["id"] == "arc-3" and got[1]["input"] == items[1]["input"]
    assert load_examples(tmp_path / "cot.jsonl") == got
    assert not partial_path(tmp_path / "cot.jsonl").exists()


def test_prompt_asks_why_the_gold_answer_is_correct(tiny_llama, tiny_tokenizer, items, monkeypatch):
    request = rationale_request(items[1])
    assert items[1]["instruction"] in request and items[1]["input"] in request and items[1]["output"] in request
    assert request == RATIONALE_PROMPT.format(question=items[1]["instruction"] + "\n\n" + items[1]["input"],
                                              answer=items[1]["output"])
    seen = []
    generate = tiny_llama.generate

    def spy(**kwargs):
        mask = kwargs["attention_mask"][0].bool()
        seen.append(tiny_tokenizer.decode(kwargs["input_ids"][0][mask]))
        return generate(**kwargs)

    monkeypatch.setattr(tiny_llama, "generate", spy)
    generate_rationales(tiny_llama, tiny_tokenizer, items[:1], max_new_tokens=2, progress=False)
    plain_tok = copy.deepcopy(tiny_tokenizer)
    plain_tok.chat_template = None
    generate_rationales(tiny_llama, plain_tok, items[:1], max_new_tokens=2, progress=False)
    assert seen[0] == f"<s>user: {rationale_request(items[0])}\nassistant: "  # the tokenizer's chat template
    assert seen[1] == f"<s>{rationale_request(items[0])}\n\nExplanation:"  # plain: BOS, request, cue
    assert resolve_template("auto", plain_tok).name == "plain"
    with pytest.raises(RationaleError, match="no chat template"):
        resolve_template("chat", plain_tok)
    with pytest.raises(RationaleError, match="template 'nope'"):
        resolve_template("nope", tiny_tokenizer)


class Interrupt:
    """model.generate that raises KeyboardInterrupt on call number `at` (1-based), counting calls."""

    def __init__(self, model, at=None):
        self.generate, self.at, self.calls = model.generate, at, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.generate(**kwargs)


def test_killed_run_resumes_to_the_identical_file(tiny_llama, tiny_tokenizer, items, tmp_path, monkeypatch):
    whole = tmp_path / "whole" / "cot.jsonl"
    generate_rationales(tiny_llama, tiny_tokenizer, items, batch_size=2, max_new_tokens=NEW, out=whole, progress=False)
    out = tmp_path / "cot.jsonl"
    monkeypatch.setattr(tiny_llama, "generate", Interrupt(tiny_llama, at=2))
    with pytest.raises(KeyboardInterrupt):
        generate_rationales(tiny_llama, tiny_tokenizer, items, batch_size=2, max_new_tokens=NEW, out=out,
                            progress=False)
    assert not out.exists()
    partial = partial_path(out)
    assert [json.loads(line) for line in partial.read_text().splitlines()] == load_examples(whole)[:2]
    with open(partial, "a") as f:  # a kill in the middle of writing the next batch
        f.write('{"instruction": "Question: Which of these do')
    monkeypatch.setattr(tiny_llama, "generate", Interrupt(tiny_llama, at=2))
    with pytest.raises(KeyboardInterrupt):  # killed again: items 3–4 follow items 1–2, the cut line is gone
        generate_rationales(tiny_llama, tiny_tokenizer, items, batch_size=2, max_new_tokens=NEW, out=out,
                            progress=False)
    assert [json.loads(line) for line in partial.read_text().splitlines()] == load_examples(whole)[:4]
    counter = Interrupt(tiny_llama)
    monkeypatch.setattr(tiny_llama, "generate", counter)
    got = generate_rationales(tiny_llama, tiny_tokenizer, items, batch_size=2, max_new_tokens=NEW, out=out,
                              progress=False)
    assert counter.calls == 1  # item 5 only
    assert out.read_bytes() == whole.read_bytes() and got == load_examples(whole)
    assert not partial.exists()


@pytest.mark.parametrize("line, message", [
    (lambda ex: {**ex[1], "output": ex[1]["output"] + "\nbecause"}, "not K-shot item 1"),  # other order
    (lambda ex: {**ex[0], "output": "Z. something else\nbecause"}, "not K-shot item 1"),  # other gold
    (lambda ex: {**ex[0], "input": "other"}, "not K-shot item 1"),
    (lambda ex: "{broken", "malformed JSON"),
])
def test_partial_file_of_other_data_is_refused(tiny_llama, tiny_tokenizer, items, tmp_path, line, message):
    out = tmp_path / "cot.jsonl"
    value = line(items)
    partial_path(out).write_text((value if isinstance(value, str) else json.dumps(value)) + "\n")
    with pytest.raises(RationaleError, match=message) as err:
        generate_rationales(tiny_llama, tiny_tokenizer, items, max_new_tokens=NEW, out=out, progress=False)
    assert str(partial_path(out)) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_more_finished_items_than_kshot_items_is_refused(tiny_llama, tiny_tokenizer, items, tmp_path):
    out = tmp_path / "cot.jsonl"
    write_jsonl(partial_path(out), [{**ex, "output": ex["output"] + "\nwhy"} for ex in items])
    with pytest.raises(RationaleError, match=":5: not K-shot item 5"):
        generate_rationales(tiny_llama, tiny_tokenizer, items[:4], max_new_tokens=NEW, out=out, progress=False)


def test_cli_end_to_end(tiny_model_dir, tiny_llama, tiny_tokenizer, items, tmp_path, capsys):
    kshot = tmp_path / "plain.jsonl"
    write_jsonl(kshot, items)
    out = tmp_path / "run" / "cot.jsonl"
    rc = cli_main(["rationale", "--model", str(tiny_model_dir), "--kshot", str(kshot), "--out", str(out),
                   "--batch-size", "2", "--max-new-tokens", str(NEW), "--no-progress", "--device", "cpu"])
    assert rc == 0 and f"wrote 5 K-shot items with rationales to {out}" in capsys.readouterr().out
    assert load_examples(out) == generate_rationales(tiny_llama, tiny_tokenizer, items, max_new_tokens=NEW,
                                                     progress=False)


@pytest.mark.parametrize("case, message", [
    ("no_model", "no such model directory"),
    ("empty", "file is empty"),
    ("out_is_kshot", "would overwrite the K-shot file"),
    ("partial_is_kshot", "would overwrite the K-shot file"),
    ("out_is_dir", "is a directory"),
    ("bad_batch", "batch_size must be >= 1"),
    ("empty_gold", "example 2: the gold answer"),
    ("bad_template", "template 'nope'"),
])
def test_cli_bad_input_is_one_line_before_loading_the_model(tiny_model_dir, items, tmp_path, capsys, monkeypatch,
                                                            case, message):
    monkeypatch.setattr(gen, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    kshot, out, model = tmp_path / "plain.jsonl", tmp_path / "cot.jsonl", tiny_model_dir
    write_jsonl(kshot, items)
    extra = []
    if case == "no_model":
        model = tmp_path / "missing"
    elif case == "empty":
        kshot.write_text("")
    elif case == "out_is_kshot":
        out = kshot
    elif case == "partial_is_kshot":
        out = tmp_path / "plain"
        kshot = kshot.rename(tmp_path / "plain.partial")
    elif case == "out_is_dir":
        out = tmp_path
    elif case == "bad_batch":
        extra = ["--batch-size", "0"]
    elif case == "empty_gold":
        write_jsonl(kshot, [items[0], {**items[1], "output": " "}])
    elif case == "bad_template":
        extra = ["--template", "nope"]
    rc = cli_main(["rationale", "--model", str(model), "--kshot", str(kshot), "--out", str(out), "--no-progress",
                   "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rocket rationale: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "cot.jsonl.partial").exists()
