"""SGMV multi-adapter LoRA kernel vs the reference (rocket/kernels/reference.py: multi_lora)."""
import pytest
import torch

from tests.helpers import poison_like, rel_err
from rocket.kernels import reference
from rocket.kernels.multi_lora import lora_merge, multi_lora, multi_lora_add_, multi_lora_blocks, segment_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, d_in, d_out, M, r, dtype, gen):
    x = torch.randn(N, d_in, generator=gen).to(dtype)
    A = (torch.randn(M, r, d_in, generator=gen) / d_in ** 0.5).to(dtype)
    B = torch.randn(M, d_out, r, generator=gen).to(dtype)
    s = torch.rand(M, generator=gen) + 0.5
    return x, A, B, s


@pytest.mark.parametrize("N, d_in, d_out, M, r", [(1, 16, 16, 1, 1), (37, 70, 45, 5, 3), (150, 33, 130, 3, 16),
                                                  (70, 64, 20, 2, 17)])
def test_multi_lora_matches_reference_unsorted_ids_with_gaps(N, d_in, d_out, M, r):
    gen = torch.Generator().manual_seed(N + d_in)
    x, A, B, s = _inputs(N, d_in, d_out, M, r, torch.float32, gen)
    ids = torch.randint(-1, M, (N,), generator=gen)  # -1: no adapter; some adapters may be absent
    out = multi_lora(x.to(DEVICE), A.to(DEVICE), B.to(DEVICE), s.to(DEVICE), ids.to(DEVICE))
    want = reference.multi_lora(x.double(), A.double(), B.double(), s.double(), ids)
    assert out.dtype == torch.float32
    assert rel_err(out, want) < 1e-5
    assert torch.all(out.cpu()[ids < 0] == 0)


def test_multi_lora_bf16():
    gen = torch.Generator().manual_seed(3)
    x, A, B, s = _inputs(130, 96, 80, 4, 8, torch.bfloat16, gen)
    ids = torch.randint(0, 4, (130,), generator=gen)
    out = multi_lora(x.to(DEVICE), A.to(DEVICE), B.to(DEVICE), s.to(DEVICE), ids.to(DEVICE))
    assert rel_err(out, reference.multi_lora(x.double(), A.double(), B.double(), s.double(), ids)) < 2e-2


def test_add_in_place_to_segments_of_multi_token_rows():
    """Rows of 9 tokens, grouped by adapter (as in a scoring batch): y += delta, every element written."""
    gen = torch.Generator().manual_seed(5)
    rows, per_row, d_in, d_out = [0, 0, 2, 2, 2, -1, 1], 9, 40, 72
    x, A, B, s = _inputs(len(rows) * per_row, d_in, d_out, 3, 5, torch.float32, gen)
    base = torch.randn(x.shape[0], d_out, generator=gen)
    y = base.clone().to(DEVICE)
    tiles = segment_tiles(rows, per_row, DEVICE, block_m=64)
    assert tiles.shape == (3, 3)  # segments of 18, 27, 9 tokens (the -1 row has none)
    multi_lora_add_(y, x.to(DEVICE), A.to(DEVICE), B.to(DEVICE), s.to(DEVICE), tiles)
    ids = torch.tensor(rows).repeat_interleave(per_row)
    want = base.double() + reference.multi_lora(x.double(), A.double(), B.double(), s.double(), ids)
    assert rel_err(y, want) < 1e-5


def test_segment_tiles_split_long_segments():
    tiles = segment_tiles([1] * 3 + [0] * 2, tokens_per_row=50, block_m=64)
    assert tiles.tolist() == [[1, 1, 1, 0, 0], [0, 64, 128, 150, 214], [64, 128, 150, 214, 250]]


def test_shape_mismatch_is_an_error():
    x, A, B, s = _inputs(4, 8, 8, 2, 2, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="do not compose"):
        multi_lora_add_(poison_like(torch.zeros(4, 9)), x, A, B, s, segment_tiles([0, 0, 1, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_out, d_in, r", [(1, 1, 1), (130, 200, 5), (64, 300, 16)])
def test_lora_merge(dtype, d_out, d_in, r):
    gen = torch.Generator().manual_seed(d_out + r)
    W = torch.randn(d_out, d_in, generator=gen).to(dtype)
    A, B = torch.randn(r, d_in, generator=gen).to(dtype), torch.randn(d_out, r, generator=gen).to(dtype)
    out = poison_like(W).to(DEVICE)
    lora_merge(out, W.to(DEVICE), A.to(DEVICE), B.to(DEVICE), 0.75)
    want = W.double() + 0.75 * (B.double() @ A.double())
    assert rel_err(out, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="compose"):
        lora_merge(out, W.to(DEVICE), torch.randn(r, d_in + 1).to(dtype).to(DEVICE), B.to(DEVICE), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_operand_gives_the_delta_in_one_product(dtype):
    """multi_lora_blocks writes each row's scaled shrink into its adapter's block of one operand (zeros
    elsewhere, rows without an adapter all zero): times the adapters' B side by side it is the delta."""
    gen = torch.Generator().manual_seed(7)
    rows, per_row, d_in, d_out, M, r = [3, 3, 0, -1, 0, 0, 5], 23, 70, 45, 6, 5  # adapters 3, 0, 5 present
    x, A, B, s = _inputs(len(rows) * per_row, d_in, d_out, M, r, dtype, gen)
    order = [3, 0, 5]  # any block order
    block_of = torch.full((M,), -1, dtype=torch.int32)
    block_of[order] = torch.arange(3, dtype=torch.int32)
    tiles = segment_tiles(rows, per_row, DEVICE)
    h = multi_lora_blocks(x.to(DEVICE), A.to(DEVICE), s.to(DEVICE), tiles, block_of.to(DEVICE), 3)
    assert h.shape == (len(rows) * per_row, 3 * r) and h.dtype == dtype
    ids = torch.tensor(rows).repeat_interleave(per_row)
    for i, a in enumerate(ids.tolist()):
        outside = [b for b in range(3) if a < 0 or b != int(block_of[a])]
        assert all(torch.all(h[i, b * r:(b + 1) * r].cpu() == 0) for b in outside), i
    blocks = B[order].permute(1, 0, 2).reshape(d_out, 3 * r)
    want = reference.multi_lora(x.double(), A.double(), B.double(), s.double(), ids)
    assert rel_err(h.cpu().double() @ blocks.double().T, want) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_multi_lora_linear_blocks_and_fused_paths_agree(monkeypatch, bias):
    """A long-segment pass (the blocks path: shrink, one product, the base GEMM adding onto it) and the
    fused kernel give the same layer output as the reference, bias and rows without an adapter included."""
    import rocket.runtime.adapters as adapters
    from rocket.adapters.stacking import StackedModule
    gen = torch.Generator().manual_seed(11)
    d_in, d_out, M, r, per_row = 256, 96, 4, 8, 70
    base = torch.nn.Linear(d_in, d_out, bias=bias).to(DEVICE)
    _, A, B, s = _inputs(1, d_in, d_out, M, r, torch.float32, gen)
    rows_of = adapters.AdapterRows(DEVICE)
    layer = adapters.MultiLoraLinear(base, StackedModule(A, B, s, torch.ones(M, dtype=torch.bool)), rows_of).to(DEVICE)
    rows = [2, 2, -1, 0, 0]  # two adapters present, 140 tokens each: 2 · 8 ≤ 256 / 16
    rows_of.set(rows)
    x = torch.randn(len(rows), per_row, d_in, generator=gen)
    ids = torch.tensor(rows).repeat_interleave(per_row)
    want = (x.reshape(-1, d_in).double() @ base.weight.detach().double().cpu().T
            + (base.bias.detach().double().cpu() if bias else 0)
            + reference.multi_lora(x.reshape(-1, d_in).double(), A.double(), B.double(), s.double(), ids))
    calls = []
    monkeypatch.setattr(adapters, "multi_lora_blocks", lambda *a: calls.append("blocks") or multi_lora_blocks(*a))
    with torch.no_grad():
        by_blocks = layer(x.to(DEVICE))
        assert calls == ["blocks"]
        monkeypatch.setattr(adapters, "BLOCKS_MIN_TOKENS", 10 ** 9)
        fused = layer(x.to(DEVICE))
        assert calls == ["blocks"]
    assert by_blocks.shape == fused.shape == (len(rows), per_row, d_out)
    assert rel_err(by_blocks.reshape(-1, d_out), want) < 1e-5 and rel_err(fused.reshape(-1, d_out), want) < 1e-5
