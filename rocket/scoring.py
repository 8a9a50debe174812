"""Stage 1: score every adapter of a bank on K-shot data (reasoning perplexity, exact-match accuracy)."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rocket.bank import LoraBank, StackedModule
from rocket.data import IGNORE_INDEX, DataError, Tokenized, tokenize_example
from rocket.errors import RocketError
from rocket.kernels import reference as R
from rocket.kernels import use_triton
from rocket.kernels.linear_ce import linear_cross_entropy_per_example
from rocket.kernels.multi_lora import lora_merge, multi_lora_add_, segment_tiles
from rocket.fastpath import FusedProjections, fast_forward, supports_fast_path
from rocket.packing import PackedBatch, pack_rows, packed_attention, supports_packing
from rocket.staging import AdapterStager, stack_modules


@dataclass
class Scores:
    """Per-adapter scores on K examples: loss/ppl [N, K] (nats, exp), ppl_sum [N] = PPL_R,
    accuracy [N] in [0, 1] or None. `names` orders the rows."""
    names: list[str]
    loss: torch.Tensor
    accuracy: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.loss = torch.as_tensor(self.loss, dtype=torch.float64)
        if self.loss.dim() != 2 or self.loss.shape[0] != len(self.names):
            raise RocketError(f"scores: loss has shape {tuple(self.loss.shape)}, expected "
                              f"[{len(self.names)} adapters, K examples]")
        if self.accuracy is not None:
            self.accuracy = torch.as_tensor(self.accuracy, dtype=torch.float64)
            if self.accuracy.shape != (len(self.names),):
                raise RocketError(f"scores: accuracy has shape {tuple(self.accuracy.shape)}, "
                                  f"expected ({len(self.names)},)")

    @property
    def ppl(self) -> torch.Tensor:
        return torch.exp(self.loss)

    @property
    def ppl_sum(self) -> torch.Tensor:
        return self.ppl.sum(dim=1)

    def to_json(self) -> dict:
        return {"adapters": self.names, "examples": self.loss.shape[1], "loss": self.loss.tolist(),
                "ppl": self.ppl.tolist(), "ppl_sum": self.ppl_sum.tolist(),
                "accuracy": None if self.accuracy is None else self.accuracy.tolist(), "meta": self.meta}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise RocketError(f"{path}: no such scores file") from None
        except json.JSONDecodeError as e:
            raise RocketError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        for key in ("adapters", "loss"):
            if key not in obj:
                raise RocketError(f"{path}: missing field '{key}'")
        loss = obj["loss"]
        if any(not math.isfinite(v) for row in loss for v in row):
            raise RocketError(f"{path}: field 'loss' has non-finite values")
        return cls(list(obj["adapters"]), torch.tensor(loss, dtype=torch.float64), obj.get("accuracy"),
                   obj.get("meta", {}))


# --------------------------------------------------------------------------- multi-adapter layers
class AdapterRows:
    """Which adapter each row of the current batch runs under (shared by all wrapped layers).

    Rows of one adapter must be contiguous (callers sort them), so every layer finds its adapter
    segments in a tile table built once per batch and token count, not once per layer. Rows either
    all span the same number of tokens (padded batches, decode steps) or have given lengths (packed)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.rows: list[int] | None = None
        self.lengths: list[int] | None = None
        self._tiles: dict[int, torch.Tensor] = {}
        self._ids: dict[int, torch.Tensor] = {}

    def set(self, rows: list[int], lengths: list[int] | None = None) -> None:
        self.rows = list(rows)
        self.lengths = None if lengths is None else list(lengths)
        self._tiles.clear()
        self._ids.clear()

    def _per_row(self, n_tokens: int):
        if self.lengths is not None:
            if sum(self.lengths) != n_tokens:
                raise RocketError(f"multi-adapter batch: {n_tokens} tokens but packed rows hold {sum(self.lengths)}")
            return self.lengths
        if not self.rows or n_tokens % len(self.rows):
            raise RocketError(f"multi-adapter batch: {n_tokens} tokens do not split into "
                              f"{len(self.rows or [])} adapter rows")
        return n_tokens // len(self.rows)

    def tiles(self, n_tokens: int) -> torch.Tensor:
        if n_tokens not in self._tiles:
            self._tiles[n_tokens] = segment_tiles(self.rows, self._per_row(n_tokens), self.device)
        return self._tiles[n_tokens]

    def token_ids(self, n_tokens: int) -> torch.Tensor:
        if n_tokens not in self._ids:
            per_row = self._per_row(n_tokens)
            reps = torch.tensor(per_row) if isinstance(per_row, list) else per_row
            self._ids[n_tokens] = torch.tensor(self.rows).repeat_interleave(reps).to(self.device)
        return self._ids[n_tokens]


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus one LoRA delta per row: y = base(x) + s_m B_m A_m x, m = the row's
    adapter (zero delta for adapters that do not cover this module). Inference only."""

    def __init__(self, base: nn.Linear, stacked: StackedModule, rows: AdapterRows):
        super().__init__()
        self.base = base
        self.rows = rows
        self.register_buffer("lora_A", stacked.A.contiguous(), persistent=False)
        self.register_buffer("lora_B", stacked.B.contiguous(), persistent=False)
        self.register_buffer("scaling", stacked.scaling.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if use_triton(x2):
            multi_lora_add_(y2, x2, self.lora_A, self.lora_B, self.scaling, self.rows.tiles(x2.shape[0]))
        else:
            ids = self.rows.token_ids(x2.shape[0])
            y2 += R.multi_lora(x2, self.lora_A, self.lora_B, self.scaling, ids).to(y.dtype)
        return y


@contextmanager
def multi_lora_model(model: nn.Module, bank: LoraBank, indices=None):
    """Wrap every linear that some chosen adapter covers with a MultiLoraLinear (restored on exit).
    Yields the AdapterRows that selects each row's adapter (local index into `indices`)."""
    bank.validate(model)
    chosen = list(range(len(bank))) if indices is None else list(indices)
    modules = sorted(set().union(*(bank[i].weights for i in chosen)))
    layers = dict(model.named_modules())
    param = next(model.parameters())
    rows = AdapterRows(param.device)
    stacks = stack_modules([bank[i] for i in chosen], {n: layers[n].weight for n in modules})
    swapped = []
    try:
        for name, stacked in stacks.items():
            base = layers[name]
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MultiLoraLinear(base, stacked, rows))
            swapped.append((parent, child, base))
        yield rows
    finally:
        for parent, child, base in reversed(swapped):
            setattr(parent, child, base)


class MergedAdapters:
    """The other way to run adapters: merge one adapter at a time into the base weights, in place
    (W ← W₀ + s·B A, one memory-bound kernel per module, W₀ kept aside and restored on `restore`). When every adapter
    has thousands of tokens to score, one merge per adapter costs far less than a LoRA pass per layer
    and lets the base model run untouched (cuBLAS GEMMs only). Each adapter's weights reach the device
    just ahead of its merge (rocket.staging), never stacked."""

    def __init__(self, model: nn.Module, bank: LoraBank, indices=None, fuse: bool = True):
        bank.validate(model)
        self.adapters = [bank[i] for i in (range(len(bank)) if indices is None else indices)]
        names = sorted(set().union(*(a.weights for a in self.adapters)))
        self.layers = {n: model.get_submodule(n) for n in names}
        # Llama-family models: q/k/v and gate/up weights in one buffer each (one GEMM per group in the
        # fast path); their tensors from before serve as the base weights W₀ (no copy needed)
        self.fused = FusedProjections(model) if fuse and supports_fast_path(model, 0) else None
        kept = self.fused.originals if self.fused is not None else {}
        try:
            self.original = {n: kept[n] if n in kept else layer.weight.detach().clone()
                             for n, layer in self.layers.items()}
            self.stager = AdapterStager(self.adapters, self.original)
        except BaseException:
            if self.fused is not None:
                self.fused.close()
            raise
        self.dirty: set[str] = set()

    @torch.no_grad()
    def merge(self, a: int) -> None:
        """Base weights + adapter a (local index); modules it does not cover get W₀ back."""
        weights = self.stager.get(a)
        scalings = self.adapters[a].scalings
        for n, layer in self.layers.items():
            if n in weights:
                lora_merge(layer.weight.data, self.original[n], *weights[n], scalings[n])
                self.dirty.add(n)
            elif n in self.dirty:
                layer.weight.data.copy_(self.original[n])
                self.dirty.discard(n)

    @torch.no_grad()
    def restore(self) -> None:
        for n in list(self.dirty):
            self.layers[n].weight.data.copy_(self.original[n])
        self.dirty.clear()

    def close(self) -> None:
        self.restore()
        self.stager.close()
        if self.fused is not None:
            self.fused.close()


@contextmanager
def merged_adapters(model: nn.Module, bank: LoraBank, indices=None, fuse: bool = True):
    merger = MergedAdapters(model, bank, indices, fuse)
    try:
        yield merger
    finally:
        merger.close()


@contextmanager
def compiled_layers(model: nn.Module, enabled: bool = True):
    """torch.compile each decoder layer (regional compilation: one layer's graph serves all of them),
    restored on exit. Fuses the norms, rotary and activation around the GEMMs."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not enabled or layers is None:
        yield
        return
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = torch.compile(layer, dynamic=True)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


# --------------------------------------------------------------------------- scoring
@dataclass
class ScoringExample:
    """One tokenized example ready to pack: its ids and the positions whose next token is a label."""
    ids: torch.Tensor        # [L] int64
    label_pos: torch.Tensor  # [n] int64: position p predicts targets[i] = token p+1
    targets: torch.Tensor    # [n] int64


def context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def tokenize_for_scoring(examples, tokenizer, template, max_length) -> list[Tokenized]:
    """Examples (dicts, or already tokenized) → Tokenized, checking the context and the labels."""
    if not examples:
        raise RocketError("scoring: no examples (the K-shot data is empty)")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Tokenized):
            if tokenizer is None:
                raise RocketError("scoring: a tokenizer is needed for untokenized examples")
            ex = tokenize_example(ex, tokenizer, template, max_length, overflow="error", where=f"example {i}")
        elif max_length is not None and len(ex.input_ids) > max_length:
            raise DataError(f"example {i}: {len(ex.input_ids)} tokens exceed the context of {max_length}")
        if not any(l != IGNORE_INDEX for l in ex.labels[1:]):
            raise DataError(f"example {i}: no output tokens to score")
        out.append(ex)
    return out


def prepare_examples(tokenized: list[Tokenized], vocab_size: int) -> list[ScoringExample]:
    out = []
    for i, t in enumerate(tokenized):
        labels = torch.tensor(t.labels[1:], dtype=torch.long)
        pos = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)[0]
        targets = labels[pos]
        if int(targets.min()) < 0 or int(targets.max()) >= vocab_size:
            raise DataError(f"example {i}: a label token id is outside the model's vocabulary of {vocab_size}")
        out.append(ScoringExample(torch.tensor(t.input_ids, dtype=torch.long), pos, targets))
    return out


def _default_max_tokens(device: torch.device) -> int:
    return 32768 if device.type == "cuda" else 4096


def _shard(n: int, distributed: bool | None) -> tuple[list[int], bool]:
    import torch.distributed as dist
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return list(range(n)), False
    return list(range(dist.get_rank(), n, dist.get_world_size())), True


def _batch_losses(model, batch: PackedBatch, path: str, prune: bool, fused=None) -> torch.Tensor:
    """Mean label loss [rows] of one packed batch: a base-model pass, logits only at label positions.
    path: 'fast' (rocket.fastpath; `prune`: the last layer's MLP on label rows only), 'packed'
    (transformers' forward, varlen attention) or 'single' (one row, transformers' own attention);
    fused: the FusedProjections of merged adapters (fast path)."""
    if path == "fast":
        hidden = fast_forward(model, batch, keep=batch.label_pos if prune else None, fused=fused)
        if not prune:
            hidden = hidden[batch.label_pos]
    else:
        kwargs = batch.forward_kwargs() if path == "packed" else dict(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        hidden = model.get_decoder()(**kwargs).last_hidden_state[0][batch.label_pos]
    return linear_cross_entropy_per_example(hidden, model.get_output_embeddings().weight, batch.targets,
                                            batch.label_row, len(batch.rows), validate=False)


@torch.no_grad()
def adapter_losses(model, adapters: "AdapterRows | MergedAdapters", examples: list[ScoringExample], n_adapters: int,
                   max_tokens: int | None = None, progress: bool = True, fast: bool | None = None) -> torch.Tensor:
    """loss [n_adapters, K] (float32, on the model's device) of every (adapter, example) pair.

    adapters: the AdapterRows of a model wrapped by multi_lora_model (rows of many adapters share a
    pass, SGMV), or a MergedAdapters (one adapter merged at a time; the packed batches, built once,
    are reused for every adapter). Rows are packed without padding into passes of ≤ max_tokens tokens
    when the model's attention allows it (else one row per pass). fast: use rocket.fastpath for
    Llama-family models (default: whenever it supports the model)."""
    device = model.get_output_embeddings().weight.device
    max_tokens = max_tokens or _default_max_tokens(device)
    lengths = [len(ex.ids) for ex in examples]
    packed = supports_packing(model)
    if fast is None or fast:
        fast = supports_fast_path(model, max(lengths))
    path = "fast" if fast else "packed" if packed else "single"
    budget = max_tokens if path != "single" else 0
    merged = isinstance(adapters, MergedAdapters)
    K = len(examples)
    loss = torch.full((n_adapters, K), float("nan"), dtype=torch.float32, device=device)
    bar = tqdm(total=n_adapters * K, desc="scoring", unit="pair", disable=not progress)
    with packed_attention(model) if path == "packed" else nullcontext():
        if merged:
            batches = [PackedBatch(b, examples, device) for b in pack_rows([(0, e) for e in range(K)], lengths, budget)]
            for a in range(n_adapters):
                adapters.merge(a)
                for batch in batches:
                    loss[a, batch.example_ids] = _batch_losses(model, batch, path, prune=True, fused=adapters.fused)
                bar.update(K)
            adapters.restore()
        else:
            rows = [(a, e) for a in range(n_adapters) for e in range(K)]  # adapter-major: long segments
            for rows_b in pack_rows(rows, lengths, budget):
                batch = PackedBatch(rows_b, examples, device)
                adapters.set([a for a, _ in rows_b], batch.lengths)
                loss[batch.adapters, batch.example_ids] = _batch_losses(model, batch, path, prune=False)
                bar.update(len(rows_b))
    bar.close()
    return loss


def choose_strategy(strategy: str, device: torch.device, tokens_per_adapter: int) -> str:
    """'auto': merge adapters one at a time on a GPU when each has ≥ 4096 tokens to score (one merge
    then costs a few % of its pass), else run many adapters per pass with the SGMV kernel."""
    if strategy not in ("auto", "merged", "sgmv"):
        raise RocketError(f"scoring: unknown strategy {strategy!r}: use auto, merged or sgmv")
    if strategy != "auto":
        return strategy
    return "merged" if device.type == "cuda" and tokens_per_adapter >= 4096 else "sgmv"


def score_adapters(model, tokenizer, bank: LoraBank, examples, template="alpaca", *,
                   accuracy: str | None = None, accuracy_file: str | Path | None = None,
                   max_new_tokens: int = 64, max_tokens: int | None = None, progress: bool = True,
                   distributed: bool | None = None, strategy: str = "auto", compile: bool = False) -> Scores:
    """Stage 1: loss/ppl [N, K] of every adapter of `bank` on `examples`, in batched passes.

    examples: dicts in the seed's schema (tokenized with `template`) or rocket.data.Tokenized.
    accuracy: an extractor ('choice', 'number', 'exact') to compute exact-match accuracy from greedy
    generations (max_new_tokens each); or accuracy_file: a JSON {adapter: accuracy}.
    max_tokens: tokens per forward pass (default 32768 on CUDA, 4096 on CPU); rows are packed unpadded.
    strategy: 'sgmv' (many adapters per pass, multi-adapter LoRA kernel), 'merged' (one adapter merged
    into the weights at a time) or 'auto' (see choose_strategy). Llama-family models (Llama, Mistral,
    Qwen2) run through rocket.fastpath; compile: instead torch.compile transformers' own decoder
    layers (merged strategy only; for other architectures, on banks large enough to repay ~10 s).
    distributed: shard adapters over torch.distributed ranks (default: when a group of >1 is up).
    """
    import time

    if accuracy is not None and accuracy_file is not None:
        raise RocketError("scoring: give either accuracy (an extractor) or accuracy_file, not both")
    if accuracy is not None:
        from rocket.generation import get_extractor
        get_extractor(accuracy)
    tokenized = tokenize_for_scoring(examples, tokenizer, template, context_length(model))
    bank.validate(model)
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if head is not None and head in bank.modules:
        raise RocketError(f"scoring: adapters on the output layer '{head}' are not supported")
    acc_file = read_accuracy(accuracy_file, bank.names) if accuracy_file is not None else None
    prepared = prepare_examples(tokenized, model.get_output_embeddings().weight.shape[0])
    mine, sharded = _shard(len(bank), distributed)
    N, K = len(bank), len(tokenized)
    device = next(model.parameters()).device
    strategy = choose_strategy(strategy, device, sum(len(ex.ids) for ex in prepared))
    start = time.perf_counter()
    acc_local = None
    if mine:
        if strategy == "merged":
            with merged_adapters(model, bank, mine) as merger, compiled_layers(model, compile):
                local = adapter_losses(model, merger, prepared, len(mine), max_tokens, progress,
                                       fast=False if compile else None)
        else:
            with multi_lora_model(model, bank, mine) as rows:
                local = adapter_losses(model, rows, prepared, len(mine), max_tokens, progress)
        if accuracy is not None:
            from rocket.generation import adapter_accuracy
            with multi_lora_model(model, bank, mine) as rows:
                acc_local = adapter_accuracy(model, rows, tokenizer, examples, tokenized, len(mine), accuracy,
                                             max_new_tokens, max_tokens, progress).to(device)
    loss = torch.zeros(N, K, dtype=torch.float32, device=device)
    if mine:
        loss[mine] = local
    acc = None
    if accuracy is not None:
        acc = torch.zeros(N, dtype=torch.float64, device=device)
        if acc_local is not None:
            acc[mine] = acc_local.double()
    if sharded:
        import torch.distributed as dist
        dist.all_reduce(loss)
        if acc is not None:
            dist.all_reduce(acc)
    if acc_file is not None:
        acc = acc_file
    seconds = time.perf_counter() - start
    meta = {"template": template if isinstance(template, str) else getattr(template, "name", str(template)),
            "examples": K, "adapters": N, "label_tokens": sum(len(ex.targets) for ex in prepared),
            "tokens": sum(len(ex.ids) for ex in prepared), "strategy": strategy, "compile": compile,
            "seconds": seconds, "pairs_per_s": N * K / seconds if seconds > 0 else None,
            "accuracy": accuracy or (str(accuracy_file) if accuracy_file else None)}
    return Scores(bank.names, loss.double().cpu(), None if acc is None else acc.cpu(), meta)


def read_accuracy(path: str | Path, names: list[str]) -> torch.Tensor:
    """Accuracy per adapter from a JSON {adapter name: accuracy in [0, 1]}, in `names` order."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise RocketError(f"{path}: no such accuracy file") from None
    except json.JSONDecodeError as e:
        raise RocketError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise RocketError(f"{path}: expected a JSON object {{adapter: accuracy}}")
    out = []
    for name in names:
        if name not in obj:
            raise RocketError(f"{path}: no accuracy for adapter '{name}'")
        v = obj[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise RocketError(f"{path}: accuracy of '{name}' must be a number in [0, 1], got {v!r}")
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------- heatmap + CLI
def save_heatmap(scores: Scores, path: str | Path) -> None:
    """Loss heatmap (adapters × examples) as a PNG, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    N, K = scores.loss.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * K, 24), min(1.5 + 0.3 * N, 24)))
    im = ax.imshow(scores.loss.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(N), scores.names, fontsize=7)
    ax.set_xlabel("example")
    ax.set_title("loss (nats) per adapter and example")
    fig.colorbar(im, ax=ax, label="loss (nats)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)


def add_arguments(parser) -> None:
    parser.add_argument("--base-model", required=True, help="HF model directory of the base model")
    parser.add_argument("--bank", required=True, help="directory of peft adapters, or a manifest .txt")
    parser.add_argument("--data", required=True, help="K-shot examples (JSONL or JSON array)")
    parser.add_argument("--out", required=True, help="scores JSON to write")
    acc = parser.add_mutually_exclusive_group()
    acc.add_argument("--accuracy", nargs="?", const="exact", choices=["choice", "number", "exact"],
                     help="also compute exact-match accuracy of greedy generations with this extractor "
                          "(default when given without a value: exact)")
    acc.add_argument("--accuracy-file", help="JSON {adapter: accuracy} to use as accuracy")
    parser.add_argument("--template", default="alpaca", help="prompt template: alpaca, llama2, mistral, chat "
                        "or a .json file (default: alpaca)")
    parser.add_argument("--heatmap", help="also write a loss heatmap PNG here")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per forward pass, rows packed without padding (default: 32768 on CUDA, "
                        "4096 on CPU)")
    parser.add_argument("--strategy", choices=["auto", "merged", "sgmv"], default="auto",
                        help="sgmv: many adapters per pass (multi-adapter LoRA kernel); merged: one adapter "
                        "merged into the weights at a time; auto: merged on a GPU when each adapter has "
                        ">= 4096 tokens to score (default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile transformers' decoder layers for the loss passes instead of rocket's "
                        "Llama fast path (for other architectures, on large banks)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length for --accuracy")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rocket.data import load_examples

    examples = load_examples(args.data)
    bank = LoraBank.load(args.bank, progress=not args.no_progress)
    base = Path(args.base_model)
    if not base.is_dir():
        raise RocketError(f"{base}: no such model directory")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype, torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="sdpa")
    model = model.to(device=args.device, dtype=dtype).eval()
    scores = score_adapters(model, tokenizer, bank, examples, args.template, accuracy=args.accuracy,
                            accuracy_file=args.accuracy_file, max_new_tokens=args.max_new_tokens,
                            max_tokens=args.max_tokens, progress=not args.no_progress, strategy=args.strategy,
                            compile=args.compile)
    scores.meta.update(base_model=str(base), bank=str(args.bank), data=str(args.data), dtype=str(dtype))
    scores.save(args.out)
    if args.heatmap:
        save_heatmap(scores, args.heatmap)
    best = int(torch.argmin(scores.ppl_sum))
    print(f"scored {len(bank)} adapters on {scores.loss.shape[1]} examples in {scores.meta['seconds']:.1f}s; "
          f"lowest PPL_R: {scores.names[best]} ({float(scores.ppl_sum[best]):.3f}); wrote {args.out}")
    return 0
