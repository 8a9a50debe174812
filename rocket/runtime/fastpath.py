"""A lean forward of Llama-family decoders (Llama, Mistral, Qwen2) for packed scoring passes.

It calls the model's own modules (embedding, rotary, projections — wrapped or merged adapters
included) in the order transformers' eager layers do, but replaces the glue between the GEMMs with
the fused kernels of `rocket.kernels.llama_ops` and keeps the residual stream in one [T, H] buffer
(the residual add is fused into the next RMSNorm). Scoring needs the last layer's output only at
label positions, so after the last attention only those rows go through o_proj, the MLP and the
final norm (`keep`). With `FusedProjections` (scoring with merged adapters), q/k/v and gate/up run
as one GEMM each.

Models of any other shape use transformers' own forward (see `supports_fast_path`).
"""
from __future__ import annotations

from typing import NamedTuple
import torch
import torch.nn.functional as F
from torch import nn
from rocket.kernels.llama_ops import add_rms_norm, rotary_, silu_mul
from rocket.runtime.packing import PackedBatch, varlen_causal_attention


_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


def _is_norm(module) -> bool:
    return type(module).__name__ in _NORMS and hasattr(module, "variance_epsilon")


def supports_fast_path(model, max_len: int) -> bool:
    """True for Llama-family decoders with plain RMSNorm, SiLU gated MLP, rotary attention without
    q/k norms, and no sliding window shorter than the longest row."""
    decoder = model.get_decoder()
    cfg = model.config
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "rotary_emb", "norm")):
        return False
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if getattr(cfg, "hidden_act", None) != "silu" or not _is_norm(decoder.norm) or (window and window < max_len):
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(layer).__name__ not in _LAYERS or not _is_norm(layer.input_layernorm) \
                or not _is_norm(layer.post_attention_layernorm) or hasattr(attn, "q_norm") \
                or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")) \
                or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return False
    return True


class FusedLayer(NamedTuple):
    """One decoder layer's fused projections: [Wq; Wk; Wv] (and bias), the q/k/v widths, [Wgate; Wup]."""
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_widths: list[int]
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None


class FusedProjections:
    """The q/k/v and the gate/up weights of every decoder layer moved into one buffer per group, so
    `fast_forward` runs one GEMM per group (the input read once, one wider product). The modules'
    weights (and biases) become views into the buffers: the model still runs as before, and in-place
    weight updates (adapter merges) land in the buffers. `originals[module name]` are the weight
    tensors from before (left untouched from here on); `close()` puts every tensor back. A layer
    whose projections are not plain nn.Linear of one input width, dtype and device, all with or all
    without bias, stays unfused."""

    def __init__(self, model: nn.Module):
        self.originals: dict[str, torch.Tensor] = {}
        self._moved: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its tensor before)
        self.layers: list[FusedLayer | None] = []
        names = {id(m): n for n, m in model.named_modules()}
        for layer in model.get_decoder().layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            if not (_fusable(qkv) and _fusable(gate_up)):
                self.layers.append(None)
                continue
            self.layers.append(FusedLayer(*self._fuse(names, qkv), [m.out_features for m in qkv],
                                          *self._fuse(names, gate_up)))

    def _fuse(self, names, mods) -> tuple:
        weight = torch.cat([m.weight.detach() for m in mods])
        bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
        row = 0
        for m in mods:
            self.originals[names[id(m)]] = m.weight.data
            for p, buf in ((m.weight, weight), (m.bias, bias)):
                if p is not None:
                    self._moved.append((p, p.data))
                    p.data = buf[row:row + m.out_features]
            row += m.out_features
        return weight, bias

    def close(self) -> None:
        """Every weight and bias back to its own tensor, with its values from before fusing."""
        for p, data in self._moved:
            p.data = data
        self._moved.clear()
        self.layers = [None] * len(self.layers)


def _fusable(mods) -> bool:
    w0, first = mods[0].weight, mods[0]
    return all(type(m) is nn.Linear and m.in_features == first.in_features and m.weight.dtype == w0.dtype
               and m.weight.device == w0.device and (m.bias is None) == (first.bias is None) for m in mods)


def fast_forward(model, batch: PackedBatch, keep: torch.Tensor | None = None,
                 fused: FusedProjections | None = None) -> torch.Tensor:
    """Final hidden states [T, H] of a packed batch (rows `keep` only, in that order, when given)."""
    decoder = model.get_decoder()
    h = decoder.embed_tokens(batch.input_ids[0])
    cos, sin = decoder.rotary_emb(h[None], batch.position_ids)
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    delta = None
    last = len(decoder.layers) - 1
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups = fused.layers[i] if fused is not None else None
        x = add_rms_norm(h, delta, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        T = x.shape[0]
        if groups is None:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        else:  # one GEMM; q, k, v are column slices of its output (rotary and attention take row strides)
            q, k, v = F.linear(x, groups.qkv_weight, groups.qkv_bias).split(groups.qkv_widths, dim=1)
        q = rotary_(q.view(T, -1, attn.head_dim), cos, sin)
        k = rotary_(k.view(T, -1, attn.head_dim), cos, sin)
        v = v.view(T, -1, attn.head_dim)
        a = varlen_causal_attention(q, k, v, batch.cu_seqlens, batch.max_len, attn.scaling).reshape(T, -1)
        if i == last and keep is not None:  # rows are independent after the last attention
            h, a = h[keep], a[keep]
        x = add_rms_norm(h, attn.o_proj(a), layer.post_attention_layernorm.weight,
                         layer.post_attention_layernorm.variance_epsilon)
        if groups is None:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        else:
            gate, up = F.linear(x, groups.gate_up_weight, groups.gate_up_bias).split(mlp.gate_proj.out_features,
                                                                                        dim=1)
        delta = mlp.down_proj(silu_mul(gate, up))
    return add_rms_norm(h, delta, decoder.norm.weight, decoder.norm.variance_epsilon)
