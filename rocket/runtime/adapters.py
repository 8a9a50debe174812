"""Running many adapters on one model: rows of different adapters in one pass (SGMV), or one
adapter merged into the weights at a time. Used by scoring and generation.
"""
from __future__ import annotations

from contextlib import contextmanager
import torch
from torch import nn
from rocket.adapters.bank import LoraBank
from rocket.adapters.stacking import StackedModule
from rocket.errors import RocketError
from rocket.kernels import reference
from rocket.kernels import use_triton
from rocket.kernels.multi_lora import lora_merge, multi_lora_add_, multi_lora_blocks, segment_tiles
from rocket.runtime.fastpath import FusedProjections, supports_fast_path
from rocket.adapters.stacking import AdapterStager, stack_modules


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
        self._blocks: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def set(self, rows: list[int], lengths: list[int] | None = None) -> None:
        self.rows = list(rows)
        self.lengths = None if lengths is None else list(lengths)
        self._tiles.clear()
        self._ids.clear()
        self._blocks = None

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

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(block_of [max id + 1] int32: each present adapter's block, the present adapters [P] int64
        in block order, P) for multi_lora_blocks; P = 0 when no row has an adapter. Once per batch."""
        if self._blocks is None:
            present = sorted({a for a in self.rows if a >= 0})
            block_of = torch.full((max(present, default=-1) + 1,), -1, dtype=torch.int32)
            block_of[present] = torch.arange(len(present), dtype=torch.int32)
            self._blocks = (block_of.to(self.device), torch.tensor(present, dtype=torch.long).to(self.device),
                            len(present))
        return self._blocks

    def token_ids(self, n_tokens: int) -> torch.Tensor:
        if n_tokens not in self._ids:
            per_row = self._per_row(n_tokens)
            reps = torch.tensor(per_row) if isinstance(per_row, list) else per_row
            self._ids[n_tokens] = torch.tensor(self.rows).repeat_interleave(reps).to(self.device)
        return self._ids[n_tokens]


# A pass runs the shrink alone and the expand as one cuBLAS GEMM onto which the base GEMM adds (see
# rocket.kernels.multi_lora.multi_lora_blocks) when its adapters' segments are long (prefill: at
# least this many tokens per adapter) and the block operand is thin (adapters · r at most d_in / 16:
# its GEMM costs at most 1/16 of the base's); otherwise one fused kernel adds every delta onto y.
BLOCKS_MIN_TOKENS = 128
BLOCKS_MAX_SHARE = 1 / 16


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
        x2 = x.reshape(-1, x.shape[-1])
        T, triton_path = x2.shape[0], use_triton(x2)
        if triton_path and type(self.base) is nn.Linear and x2.dtype == self.base.weight.dtype:
            block_of, present, P = self.rows.blocks()
            if 0 < P and T >= BLOCKS_MIN_TOKENS * P and P * self.lora_A.shape[1] <= BLOCKS_MAX_SHARE * x2.shape[1]:
                return self._by_blocks(x2, block_of, present, P).view(*x.shape[:-1], -1)
        y = self.base(x)
        y2 = y.view(-1, y.shape[-1])
        if triton_path:
            multi_lora_add_(y2, x2, self.lora_A, self.lora_B, self.scaling, self.rows.tiles(T))
        else:
            ids = self.rows.token_ids(T)
            y2 += reference.multi_lora(x2, self.lora_A, self.lora_B, self.scaling, ids).to(y.dtype)
        return y

    def _by_blocks(self, x2, block_of, present, P):
        """The delta as h @ B_blocksᵀ (cuBLAS), then the base GEMM adding x Wᵀ onto it in place."""
        h = multi_lora_blocks(x2, self.lora_A, self.scaling, self.rows.tiles(x2.shape[0]), block_of, P)
        blocks = self.lora_B.index_select(0, present).permute(1, 0, 2).reshape(self.lora_B.shape[1], -1)
        bias = self.base.bias
        y2 = torch.mm(h, blocks.t()) if bias is None else torch.addmm(bias, h, blocks.t())
        return y2.addmm_(x2, self.base.weight.t())


@contextmanager
def multi_lora_model(model: nn.Module, bank: LoraBank, indices=None):
    """Wrap every linear that some chosen adapter covers with a MultiLoraLinear (restored on exit).
    Yields the AdapterRows that selects each row's adapter (local index into `indices`). The bank
    must have been validated against the model (score_adapters does, once)."""
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
    just ahead of its merge (rocket.adapters.stacking), never stacked."""

    def __init__(self, model: nn.Module, bank: LoraBank, indices=None, fuse: bool = True):
        # the bank was validated against the model by the caller (score_adapters)
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
