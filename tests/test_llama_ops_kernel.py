"""Fused Llama glue kernels (rocket/kernels/llama_ops.py) vs the references, and rocket.fastpath vs
transformers' own forward of the tiny Llama."""
import copy

import pytest
import torch

from tests.helpers import rel_err
from rocket.kernels import reference
from rocket.kernels.llama_ops import add_rms_norm, rotary_, silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, H", [(1, 16), (37, 72)])
def test_add_rms_norm(dtype, T, H):
    gen = torch.Generator().manual_seed(T * H)
    h0 = (torch.randn(T, H, generator=gen) * 3).to(dtype)
    d = torch.randn(T, H, generator=gen).to(dtype)
    w = (torch.rand(H, generator=gen) + 0.5).to(dtype)
    h = h0.clone().to(DEVICE)
    out = add_rms_norm(h, d.to(DEVICE), w.to(DEVICE), 1e-6)
    want_h = (h0.float() + d.float()).to(dtype)
    want = reference.rms_norm(want_h, w, 1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(h, want_h) < tol and rel_err(out, want) < tol
    # no delta: a plain norm, h untouched
    out2 = add_rms_norm(h, None, w.to(DEVICE), 1e-6)
    assert rel_err(out2, want) < tol and rel_err(h, want_h) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, heads, d", [(1, 1, 16), (29, 5, 32), (8, 20, 16),
                                         (7, 3, 12), (5, 4, 80), (3, 2, 100)])  # head_dim/2 not a power of 2
def test_rotary_in_place(dtype, T, heads, d):
    gen = torch.Generator().manual_seed(T + heads)
    x0 = torch.randn(T, heads, d, generator=gen).to(dtype)
    ang = torch.rand(T, d // 2, generator=gen) * 20
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    x = x0.clone().to(DEVICE)
    rotary_(x, cos.to(DEVICE), sin.to(DEVICE))
    want = reference.rotary(x0.double(), cos.double(), sin.double())
    assert rel_err(x, want) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("halves", [False, True])
def test_silu_mul(dtype, halves):
    """Separate tensors, or the two halves of one fused gate/up product (strided rows)."""
    gen = torch.Generator().manual_seed(7)
    g, u = (torch.randn(33, 301, generator=gen) * 4).to(dtype), torch.randn(33, 301, generator=gen).to(dtype)
    if halves:
        gu = torch.cat([g, u], dim=1).to(DEVICE)
        out = silu_mul(gu[:, :301], gu[:, 301:])
    else:
        out = silu_mul(g.to(DEVICE), u.to(DEVICE))
    assert out.is_contiguous() and out.shape == (33, 301)
    assert rel_err(out, reference.silu_mul(g.double(), u.double())) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_bad_shapes():
    with pytest.raises(ValueError, match="contiguous"):
        rotary_(torch.randn(4, 16, 2).transpose(1, 2).to(DEVICE), torch.randn(4, 16).to(DEVICE),
                torch.randn(4, 16).to(DEVICE))
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(torch.randn(4, 8).to(DEVICE), torch.randn(4, 9).to(DEVICE))


def _fast_and_hf(model, tokenizer, kshot_examples):
    """(fast_forward of two packed rows, label rows only, batch; each row alone through the HF model)."""
    from rocket.data.tokenize import tokenize_examples
    from rocket.runtime.fastpath import fast_forward, supports_fast_path
    from rocket.runtime.packing import PackedBatch
    from rocket.runtime.losses import prepare_examples

    short = sorted(kshot_examples, key=lambda e: len(e["instruction"]) + len(e["output"]))[:2]
    ex = prepare_examples(tokenize_examples(short, tokenizer), model.config.vocab_size)
    assert supports_fast_path(model, 100)
    batch = PackedBatch([(0, 1), (0, 0)], ex, DEVICE)
    with torch.no_grad():
        full = fast_forward(model, batch)
        labels_only = fast_forward(model, batch, keep=batch.label_pos)
        want = torch.cat([model.model(input_ids=ex[e].ids[None].to(DEVICE)).last_hidden_state[0] for e in (1, 0)])
    return full, labels_only, batch, want


def test_fast_forward_equals_transformers(tiny_llama, tiny_tokenizer, kshot_examples):
    """Packed rows through rocket.fastpath (all rows, and label rows only) vs each row alone through
    the HF model (float32)."""
    from rocket.runtime.fastpath import supports_fast_path

    model = tiny_llama.to(DEVICE)
    full, labels_only, batch, want = _fast_and_hf(model, tiny_tokenizer, kshot_examples)
    assert full.shape == want.shape and rel_err(full, want) < 1e-5
    assert rel_err(labels_only, want[batch.label_pos]) < 1e-5
    other = copy.deepcopy(model)
    other.config.hidden_act = "gelu"
    assert not supports_fast_path(other, 100)


@pytest.mark.parametrize("hidden, heads", [(48, 4), (80, 4)])   # head_dim 12 and 20
def test_fast_forward_with_head_dims_off_powers_of_two(tiny_tokenizer, kshot_examples, hidden, heads):
    """OpenLLaMA-3B (head_dim 100) and Phi-2 (80) style heads: the fast path handles them exactly."""
    from rocket.tiny import build_llama

    model = build_llama(tiny_tokenizer, hidden=hidden, heads=heads, kv_heads=heads // 2, seed=5).to(DEVICE)
    assert model.config.hidden_size // heads in (12, 20)
    full, labels_only, batch, want = _fast_and_hf(model, tiny_tokenizer, kshot_examples)
    assert rel_err(full, want) < 1e-5 and rel_err(labels_only, want[batch.label_pos]) < 1e-5


def test_fused_projections(tiny_llama):
    """q/k/v and gate/up as one GEMM each: the same hidden states as the separate projections, the
    modules' weights are views into the fused buffers (an in-place update lands there, as adapter
    merges do), a layer with a non-Linear projection stays unfused, and close() gives every parameter
    its own tensor back with the values from before."""
    from rocket.runtime.fastpath import FusedProjections, fast_forward
    from rocket.runtime.packing import PackedBatch
    from rocket.runtime.losses import ScoringExample

    model = copy.deepcopy(tiny_llama).to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in (37, 20)]
    ex = [ScoringExample(t, torch.arange(5, len(t) - 1), t[6:]) for t in ids]
    batch = PackedBatch([(0, 0), (0, 1)], ex, DEVICE)
    layers = model.model.layers
    layers[1].mlp.up_proj = _Scaled(layers[1].mlp.up_proj)  # not a plain nn.Linear: layer 1 stays unfused
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    with torch.no_grad():
        want = fast_forward(model, batch)
        fused = FusedProjections(model)
        assert fused.layers[0] is not None and fused.layers[1] is None
        assert layers[0].self_attn.k_proj.weight.data_ptr() != before["model.layers.0.self_attn.k_proj.weight"][0]
        got = fast_forward(model, batch, fused=fused)
        assert rel_err(got, want) < 1e-5
        layers[0].self_attn.v_proj.weight.mul_(2.0)  # lands in the fused buffer
        changed = fast_forward(model, batch, fused=fused)
        fused.close()
        layers[0].self_attn.v_proj.weight.data = before["model.layers.0.self_attn.v_proj.weight"][1].clone()
        assert rel_err(changed, fast_forward(model, batch)) > 1e-3  # the update was seen
    for n, p in model.named_parameters():
        if "v_proj" not in n or ".0." not in n:
            assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n


class _Scaled(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.out_features = inner, inner.out_features

    def forward(self, x):
        return self.inner(x) * 1.0
