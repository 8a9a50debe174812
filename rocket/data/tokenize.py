"""Tokenisation with label masks (loss over the output tokens + EOS only)."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from rocket.data.examples import DataError
from rocket.data.templates import PromptTemplate


IGNORE_INDEX = -100


# --------------------------------------------------------------------------- tokenisation
@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]          # IGNORE_INDEX on the prompt; output tokens + EOS otherwise
    prompt_len: int

    @classmethod
    def prompt_only(cls, ids: list[int]) -> Tokenized:
        """A prompt to generate from: every position masked, no output."""
        return cls(list(ids), [IGNORE_INDEX] * len(ids), len(ids))


def prompt_ids(example: dict, tokenizer, template="alpaca") -> list[int]:
    """Token ids of the example's prompt: special tokens (BOS) added, except for `chat`, whose
    template writes its own."""
    tpl = PromptTemplate.get(template)
    return tokenizer(tpl.prompt(example, tokenizer), add_special_tokens=tpl.name != "chat")["input_ids"]


def tokenize_example(example: dict, tokenizer, template="alpaca", max_length: int | None = None,
                     overflow: str = "error", where: str = "example") -> Tokenized | None:
    """Prompt tokens (masked with -100) followed by output tokens and EOS.

    overflow: what to do when the example exceeds max_length: 'error' (clear error), 'truncate'
    (cut from the end; None if no output token is left), or 'drop' (return None).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token_id: rocket appends EOS to every output")
    prompt = prompt_ids(example, tokenizer, template)
    output_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt + output_ids
    labels = [IGNORE_INDEX] * len(prompt) + output_ids
    if max_length is not None and len(ids) > max_length:
        if overflow == "error":
            raise DataError(f"{where}: {len(ids)} tokens exceed the context of {max_length}")
        if overflow == "drop" or len(prompt) >= max_length:
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(ids, labels, len(prompt))


def tokenize_examples(examples, tokenizer, template="alpaca", max_length=None, overflow="error"):
    """Tokenise a list of examples; items dropped by `overflow` come back as None."""
    return [tokenize_example(ex, tokenizer, template, max_length, overflow, where=f"example {i}")
            for i, ex in enumerate(examples)]


def pad_rows(flat: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, width: int, fill: int,
             side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows flat[starts[i] : starts[i] + lengths[i]] as one [len(lengths), width] tensor padded with
    `fill` on `side`, and its attention mask (1 on tokens, int64); width ≥ the longest row. One
    vectorised gather: no per-row work on the host."""
    if side not in ("right", "left"):
        raise ValueError(f"pad_rows: side must be 'right' or 'left', got {side!r}")
    lengths, starts = lengths.reshape(-1, 1), starts.reshape(-1, 1)
    cols = torch.arange(width).reshape(1, -1)
    if side == "left":
        cols = cols - (width - lengths)
    mask = (cols >= 0) & (cols < lengths)
    out = torch.full((lengths.shape[0], width), fill, dtype=flat.dtype)
    out[mask] = flat[(starts + cols)[mask]]
    return out, mask.long()


def pad_batch(rows: list[Tokenized], pad_id: int, device=None, multiple: int = 1, side: str = "right") -> dict:
    """input_ids / attention_mask / labels of `rows`, padded to the longest rounded up to
    `multiple`, with their token counts (`n_input`, `n_target`) counted on the host, so a training
    loop never waits for the device to learn them. Built by `pad_rows`, rocket's one padder.

    side: "right" (training, loss evaluation) or "left" (generation: every row's next token is at the
    same column, the end)."""
    if side not in ("right", "left"):
        raise ValueError(f"pad_batch: side must be 'right' or 'left', got {side!r}")
    lengths = torch.tensor([len(t.input_ids) for t in rows])
    starts = torch.cumsum(lengths, 0) - lengths
    L = -(-int(lengths.max()) // multiple) * multiple
    ids, mask = pad_rows(torch.tensor(list(chain.from_iterable(t.input_ids for t in rows))), lengths, starts, L,
                         pad_id, side)
    labels, _ = pad_rows(torch.tensor(list(chain.from_iterable(t.labels for t in rows))), lengths, starts, L,
                         IGNORE_INDEX, side)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "n_input": int(mask.sum()), "n_target": int((labels[:, 1:] != IGNORE_INDEX).sum())}
