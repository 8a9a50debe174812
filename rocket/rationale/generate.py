"""Rationale generation Φ: a strong instruct model explains why each K-shot item's gold answer is
correct, and the item's output becomes the gold answer followed by that rationale — the layout of
the reference implementation's CoT K-shot files, on which reasoning perplexity is scored
(docs/design.md, 'Reasoning perplexity').

Decoding is greedy and batched: prompts are left-padded by the one padded-batch builder
(`rocket.data.tokenize.pad_batch`) and decoded by transformers' `generate` until EOS or
`max_new_tokens`; in float32, batching and padding do not change a result (tests/test_rationale.py
checks it token for token against a plain argmax loop). With `out`, finished items are appended to
`out.partial` after every batch, a restart continues after them, and `out` appears atomically once
every item is done.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from rocket.data.examples import load_examples, write_jsonl
from rocket.data.templates import PromptTemplate
from rocket.data.tokenize import Tokenized, pad_batch, prompt_ids
from rocket.errors import DataError, RationaleError
from rocket.modeling import default_device, load_base, load_tokenizer
from rocket.progress import progress_bar

# The request sent to the rationale model for every item: the question (instruction, then input
# when there is one) and its gold answer, asking for the reasoning that leads to that answer and
# for nothing else, so that the generated text can follow the answer as it stands.
RATIONALE_PROMPT = (
    "Below is a question together with its correct answer.\n\n"
    "<question>\n{question}\n</question>\n\n"
    "<answer>\n{answer}\n</answer>\n\n"
    "Explain step by step why this answer is correct: the facts and the reasoning the question "
    "needs and, when there are options, why the others are wrong. Write only the explanation; "
    "do not repeat the answer first and do not doubt it."
)
# Between the gold answer and its rationale in `output` (the reference implementation's CoT files
# put the rationale on the line after the answer).
SEPARATOR = "\n"
# The prompt for tokenizers without a chat template: the request, then a cue to answer it.
PLAIN = PromptTemplate("plain", prompt_no_input="{instruction}\n\nExplanation:")


def resolve_template(spec: str | PromptTemplate = "auto", tokenizer=None) -> PromptTemplate:
    """The prompt template that wraps the request: `auto` — the tokenizer's chat template when it
    has one, else `plain` (the request and an 'Explanation:' cue); or `plain`, `chat`, `alpaca`,
    `llama2`, `mistral`, a template .json file, a PromptTemplate."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if spec == "auto":
        return PromptTemplate.get("chat") if has_chat else PLAIN
    if spec == "plain":
        return PLAIN
    try:
        tpl = PromptTemplate.get(spec)
    except DataError as e:
        raise RationaleError(f"template {spec!r}: {e}; or use auto or plain") from None
    if tpl.name == "chat" and not has_chat:
        raise RationaleError("template 'chat': the tokenizer has no chat template (use auto or plain)")
    return tpl


def rationale_request(example: dict) -> str:
    """RATIONALE_PROMPT filled with the example's question and gold answer."""
    question = example["instruction"]
    if example.get("input"):
        question = f"{question}\n\n{example['input']}"
    return RATIONALE_PROMPT.format(question=question, answer=example["output"])


def with_rationale(example: dict, rationale: str) -> dict:
    """The example with `output` = gold answer, SEPARATOR, rationale (the gold alone when the
    rationale is empty); every other field kept."""
    gold = example["output"]
    return {**example, "output": f"{gold}{SEPARATOR}{rationale}" if rationale else gold}


def _continues(item, example: dict) -> bool:
    """Whether a finished item is `example` with a rationale: same instruction, input and gold."""
    if not isinstance(item, dict) or not isinstance(item.get("output"), str):
        return False
    gold = example["output"]
    return (item.get("instruction") == example["instruction"] and item.get("input", "") == example.get("input", "")
            and (item["output"] == gold or item["output"].startswith(gold + SEPARATOR)))


def partial_path(out: str | os.PathLike) -> Path:
    """Where the finished items of an unfinished run to `out` are kept."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _resume(partial: Path, examples: list[dict]) -> list[dict]:
    """The finished items of the partial file, after checking that they are the first K-shot items;
    a last line cut short by a kill is removed from the file."""
    if not partial.is_file():
        return []
    data = partial.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(partial, "r+b") as f:
            f.truncate(len(whole))
    done = []
    for i, line in enumerate(whole.decode("utf-8").splitlines()):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise RationaleError(f"{partial}:{i + 1}: malformed JSON ({e.msg}); delete the file to start over") from None
        if i >= len(examples) or not _continues(item, examples[i]):
            raise RationaleError(f"{partial}:{i + 1}: not K-shot item {i + 1} with a rationale (instruction, input or "
                                 "gold answer differ): the partial file is from other data; delete it to start over")
        done.append(item)
    return done


def _check(examples, batch_size: int, max_new_tokens: int) -> None:
    if batch_size < 1:
        raise RationaleError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise RationaleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not examples:
        raise RationaleError("no K-shot examples")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not all(isinstance(ex.get(f), str) for f in ("instruction", "output")):
            raise RationaleError(f"example {i + 1}: needs string 'instruction' and 'output'")
        if not ex["output"].strip():
            raise RationaleError(f"example {i + 1}: the gold answer ('output') is empty")


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation EOS ids
    (instruct models often end their turn with a token of their own)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise RationaleError("the tokenizer and the model define no EOS token: generation could not stop")
    return ids


@torch.no_grad()
def _greedy(model, tokenizer, prompts: list[list[int]], eos_ids: list[int], pad_id: int,
            max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded prompts, cut at the first EOS, decoded and stripped."""
    batch = pad_batch([Tokenized.prompt_only(p) for p in prompts], pad_id, model.device, side="left")
    width = batch["input_ids"].shape[1]
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_ids, pad_token_id=pad_id)
    texts = []
    for seq in out[:, width:].tolist():
        end = next((j for j, t in enumerate(seq) if t in eos_ids), len(seq))
        texts.append(tokenizer.decode(seq[:end], skip_special_tokens=True).strip())
    return texts


def generate_rationales(model, tokenizer, examples: list[dict], *, template: str | PromptTemplate = "auto",
                        batch_size: int = 8, max_new_tokens: int = 256, out: str | os.PathLike | None = None,
                        progress: bool = True) -> list[dict]:
    """For every K-shot example, greedily generate a rationale for its gold answer and return the
    examples with `output` = gold answer, SEPARATOR, rationale (other fields kept), in input order.

    template: how the request (RATIONALE_PROMPT) is wrapped, see `resolve_template`.
    out: also write the items there as JSONL; finished items go to `out.partial` after every batch,
    a restart skips them (they must be the first K-shot items), and `out` appears atomically when
    all are done, the partial file then removed.
    """
    _check(examples, batch_size, max_new_tokens)
    tpl = resolve_template(template, tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    partial = partial_path(out) if out is not None else None
    results = _resume(partial, examples) if partial is not None else []
    prompts = [prompt_ids({"instruction": rationale_request(ex), "input": ""}, tokenizer, tpl)
               for ex in examples[len(results):]]
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
    with progress_bar(total=len(examples), initial=len(results), desc="rationales", unit="item", disable=not progress) as bar, \
            (open(partial, "a", encoding="utf-8") if partial is not None else nullcontext()) as sink:
        for start in range(0, len(prompts), batch_size):
            first = len(results)
            rationales = _greedy(model, tokenizer, prompts[start:start + batch_size], eos_ids, pad_id, max_new_tokens)
            items = [with_rationale(ex, r) for ex, r in zip(examples[first:first + len(rationales)], rationales)]
            if sink is not None:
                sink.write("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
                sink.flush()
                os.fsync(sink.fileno())
            results.extend(items)
            bar.update(len(items))
    empty = sum(item["output"] == ex["output"] for item, ex in zip(results, examples))
    if empty:
        warnings.warn(f"{empty} of {len(examples)} rationales came back empty; those items keep the gold answer alone")
    if out is not None:
        write_jsonl(out, results)
        partial.unlink()
    return results


def write_rationales(model_dir: str | os.PathLike, kshot: str | os.PathLike, out: str | os.PathLike, *,
                     tokenizer: str | os.PathLike | None = None, device=None, dtype="auto", template: str = "auto",
                     batch_size: int = 8, max_new_tokens: int = 256, progress: bool = True) -> list[dict]:
    """`rocket rationale`: check the inputs (before any model is loaded), load the model directory
    with rocket.modeling.load_base and write `out` with `generate_rationales` (resumable).
    tokenizer: a tokenizer directory instead of the one saved with the model (--tokenizer)."""
    model_dir, kshot, out = Path(model_dir), Path(kshot), Path(out)
    if not model_dir.is_dir():
        raise RationaleError(f"{model_dir}: no such model directory")
    if out.is_dir():
        raise RationaleError(f"{out}: is a directory; the output is a JSONL file")
    if kshot.resolve() in (out.resolve(), partial_path(out).resolve()):
        raise RationaleError(f"{out}: the output would overwrite the K-shot file {kshot}; write it elsewhere")
    examples = load_examples(kshot)
    _check(examples, batch_size, max_new_tokens)
    tokenizer = load_tokenizer(model_dir, tokenizer)
    tpl = resolve_template(template, tokenizer)
    model, tokenizer = load_base(model_dir, default_device(device), dtype, tokenizer)
    return generate_rationales(model, tokenizer, examples, template=tpl, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, out=out, progress=progress)
