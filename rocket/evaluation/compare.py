"""The question every run ends with: does the trained LoRA-MoE beat the base model and each expert
alone on held-out data? One row per model — the base, every adapter of the bank, the MoE — with the
loss and accuracy scoring uses (docs/design.md, 'Reasoning perplexity' and 'Accuracy'), computed
by the same batched passes (rocket.runtime.losses, rocket.runtime.generation).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rocket.adapters.bank import LoraBank
from rocket.data.answers import DEFAULT_MAX_NEW_TOKENS, AnswerKey, answer_key
from rocket.data.examples import load_examples
from rocket.errors import EvaluationError
from rocket.io import write_json
from rocket.modeling import check_tokenizer_dir, default_device, load_base
from rocket.moe.inject import moe_layers
from rocket.moe.state import load_moe
from rocket.runtime.adapters import multi_lora_model
from rocket.runtime.generation import adapter_accuracy
from rocket.runtime.losses import adapter_losses, context_length, prepare_examples, tokenize_for_scoring, validate_bank

BASE, MOE = "base", "rocket MoE"


@dataclass
class EvalRow:
    name: str                # 'base', 'adapter NAME' or 'rocket MoE'
    kind: str                # 'base', 'adapter' or 'moe'
    loss: float              # nats/token: mean over each example's output tokens (and EOS), then over examples
    accuracy: float | None   # exact-match accuracy of greedy generations; None when accuracy is off
    examples: int


@dataclass
class EvalTable:
    rows: list[EvalRow]      # the base, the bank's adapters in bank order, the MoE
    extractor: dict | None   # {name, auto, reason} of the extractor that ran; None when accuracy is off
    meta: dict

    def ranked(self) -> list[EvalRow]:
        """The rows by loss, lowest first (ties keep table order)."""
        return sorted(self.rows, key=lambda r: r.loss)

    def moe_vs_best(self) -> dict:
        """The MoE against the best other row: by loss (delta < 0: the MoE is lower than every other
        row) and by accuracy (delta > 0: higher than every other row; None when accuracy is off)."""
        moe = next(r for r in self.rows if r.kind == "moe")
        others = [r for r in self.rows if r is not moe]
        by_loss = min(others, key=lambda r: r.loss)
        out = {"loss": {"row": by_loss.name, "delta": moe.loss - by_loss.loss}, "accuracy": None}
        if moe.accuracy is not None:
            by_acc = max(others, key=lambda r: r.accuracy)
            out["accuracy"] = {"row": by_acc.name, "delta": moe.accuracy - by_acc.accuracy}
        return out

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "extractor": self.extractor,
                "moe_vs_best": self.moe_vs_best(), "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def format(self) -> str:
        """The header (examples, the extractor that ran), the rows by loss, and the MoE's margins."""
        acc = "off" if self.extractor is None else (
            f"extractor '{self.extractor['name']}'" + (f" (auto: {self.extractor['reason']})"
                                                       if self.extractor["auto"] else ""))
        width = max(len(r.name) for r in self.rows)
        lines = [f"held-out evaluation on {self.meta['examples']} examples; accuracy: {acc}",
                 f"{'row':<{width}}  {'loss':>8}  {'accuracy':>8}  {'examples':>8}"]
        for r in self.ranked():
            a = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
            lines.append(f"{r.name:<{width}}  {r.loss:>8.4f}  {a:>8}  {r.examples:>8}")
        loss, acc = self.moe_vs_best().values()
        verdict = f"{MOE} vs the best other row: loss {loss['delta']:+.4f} nats/token ({loss['row']})"
        if acc is not None:
            verdict += f", accuracy {acc['delta']:+.3f} ({acc['row']})"
        return "\n".join(lines + [verdict])


def _measure(model, rows, n: int, prepared, tokenizer, key: AnswerKey | None, prompts, max_new_tokens: int,
             max_tokens: int | None, progress: bool) -> tuple[list[float], list[float] | None]:
    """Mean loss and accuracy of n rows: the adapters `rows` selects, or the model as it is (None, n=1)."""
    loss = adapter_losses(model, rows, prepared, n, max_tokens, progress).double().mean(1).tolist()
    if key is None:
        return loss, None
    acc, _ = adapter_accuracy(model, rows, tokenizer, key, prompts, n, max_new_tokens, max_tokens, progress)
    return loss, acc.tolist()


def evaluate(model, tokenizer, bank: LoraBank, moe, examples, *, template="alpaca", accuracy: str | None = "auto",
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_tokens: int | None = None, progress: bool = True,
             log=print) -> EvalTable:
    """Rows `base` (model alone), `adapter NAME` (each adapter of `bank` on model alone) and `rocket MoE`
    (`moe`, a model carrying the trained LoRA-MoE, e.g. rocket.load_moe's) on held-out `examples`.

    loss: as scoring's (mean over each example's output tokens, then over the examples), packed
    passes of ≤ max_tokens tokens, the adapters many per pass (SGMV). accuracy: as scoring's —
    'auto' (the extractor follows the golds), 'choice', 'number', 'exact', or None (loss only) —
    but no tie is refused: a row at 0 is a result here. Greedy generations of max_new_tokens.
    log: where the line naming the extractor goes.
    """
    start = time.perf_counter()
    if not examples:
        raise EvaluationError("evaluation: no examples (the held-out data is empty)")
    if moe_layers(model):
        raise EvaluationError("evaluation: the base model carries LoRA-MoE layers; give the plain base model "
                              "and the MoE model (rocket.load_moe) separately")
    if not moe_layers(moe):
        raise EvaluationError("evaluation: the MoE model has no LoRA-MoE layers (load it with rocket.load_moe)")
    head = next((n for n, m in moe.named_modules() if m is moe.get_output_embeddings()), None)
    if head in moe_layers(moe):
        raise EvaluationError(f"evaluation: a LoRA-MoE on the output layer '{head}' is not supported")
    if moe.training:
        raise EvaluationError("evaluation: the MoE model is in training mode (expert dropout on); call .eval()")
    vocab = model.get_output_embeddings().weight.shape[0]
    if moe.get_output_embeddings().weight.shape[0] != vocab:
        raise EvaluationError(f"evaluation: the MoE model's vocabulary ({moe.get_output_embeddings().weight.shape[0]}) "
                              f"is not the base model's ({vocab})")
    key = None if accuracy is None else answer_key(examples, accuracy)
    validate_bank(model, bank)
    tokenized = tokenize_for_scoring(examples, tokenizer, template, context_length(model))
    prepared = prepare_examples(tokenized, vocab)
    prompts = [t.input_ids[:t.prompt_len] for t in tokenized]
    if key is not None:
        log(f"accuracy: extractor '{key.extractor}'" + (f" (auto: {key.reason})" if key.auto else ""))
    common = (prepared, tokenizer, key, prompts, max_new_tokens, max_tokens, progress)
    base_loss, base_acc = _measure(model, None, 1, *common)
    with multi_lora_model(model, bank) as rows:
        loss, acc = _measure(model, rows, len(bank), *common)
    moe_loss, moe_acc = _measure(moe, None, 1, *common)
    K = len(prepared)
    names = [BASE] + [f"adapter {n}" for n in bank.names] + [MOE]
    kinds = ["base"] + ["adapter"] * len(bank) + ["moe"]
    accs = [None] * len(names) if key is None else base_acc + acc + moe_acc
    table = [EvalRow(n, k, l, a, K) for n, k, l, a in zip(names, kinds, base_loss + loss + moe_loss, accs)]
    meta = {"template": template if isinstance(template, str) else getattr(template, "name", str(template)),
            "examples": K, "adapters": len(bank), "label_tokens": sum(len(ex.targets) for ex in prepared),
            "max_new_tokens": max_new_tokens if key is not None else None,
            "seconds": time.perf_counter() - start}
    extractor = None if key is None else {"name": key.extractor, "auto": key.auto, "reason": key.reason}
    return EvalTable(table, extractor, meta)


def load_eval_examples(data, accuracy: str | None = "auto"):
    """The held-out examples of a file, every gold checked against the extractor (cheap, text only:
    run it before any model loads)."""
    examples = load_examples(data)
    if accuracy is not None:
        answer_key(examples, accuracy)
    return examples


def evaluate_files(base_model, moe, bank, data, *, device=None, template="alpaca", accuracy: str | None = "auto",
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_tokens: int | None = None,
                   progress: bool = True, log=print, tokenizer=None) -> EvalTable:
    """evaluate() from paths: the base-model directory, the MoE (what `rocket train --out` wrote, a
    checkpoint directory or its moe.safetensors), the bank (directory or manifest, e.g. experts.txt)
    and the held-out data; tokenizer: a tokenizer directory instead of the base model's (--tokenizer).
    Data, golds, bank and tokenizer are checked before any model loads. The
    base weights are in memory twice: the plain model and the one carrying the MoE."""
    examples = load_eval_examples(data, accuracy)
    check_tokenizer_dir(base_model, tokenizer)
    adapters = LoraBank.load(bank, progress=progress)
    device = default_device(device)
    moe_model = load_moe(base_model, moe, device=device)  # checks its file, then the base directory, first
    model, tokenizer = load_base(base_model, device, tokenizer=tokenizer)
    table = evaluate(model, tokenizer, adapters, moe_model, examples, template=template, accuracy=accuracy,
                     max_new_tokens=max_new_tokens, max_tokens=max_tokens, progress=progress, log=log)
    table.meta.update(base_model=str(base_model), moe=str(moe), bank=str(bank), data=str(data),
                      dtype=str(next(model.parameters()).dtype))
    return table
