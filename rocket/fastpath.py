"""A lean forward of Llama-family decoders (Llama, Mistral, Qwen2) for packed scoring passes.

It calls the model's own modules (embedding, rotary, projections — wrapped or merged adapters
included) in the order transformers' eager layers do, but replaces the glue between the GEMMs with
the fused kernels of `rocket.kernels.llama_ops` and keeps the residual stream in one [T, H] buffer
(the residual add is fused into the next RMSNorm). Scoring needs the last layer's output only at
label positions, so after the last attention only those rows go through o_proj, the MLP and the
final norm (`keep`).

Models of any other shape use transformers' own forward (see `supports_fast_path`).
"""
from __future__ import annotations

import torch

from rocket.kernels.llama_ops import add_rms_norm, rotary_, silu_mul
from rocket.packing import PackedBatch, varlen_causal_attention

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


def fast_forward(model, batch: PackedBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [T, H] of a packed batch (rows `keep` only, in that order, when given)."""
    decoder = model.get_decoder()
    h = decoder.embed_tokens(batch.input_ids[0])
    cos, sin = decoder.rotary_emb(h[None], batch.position_ids)
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    delta = None
    last = len(decoder.layers) - 1
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        x = add_rms_norm(h, delta, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        T = x.shape[0]
        q = rotary_(attn.q_proj(x).view(T, -1, attn.head_dim), cos, sin)
        k = rotary_(attn.k_proj(x).view(T, -1, attn.head_dim), cos, sin)
        v = attn.v_proj(x).view(T, -1, attn.head_dim)
        a = varlen_causal_attention(q, k, v, batch.cu_seqlens, batch.max_len, attn.scaling).reshape(T, -1)
        if i == last and keep is not None:  # rows are independent after the last attention
            h, a = h[keep], a[keep]
        x = add_rms_norm(h, attn.o_proj(a), layer.post_attention_layernorm.weight,
                         layer.post_attention_layernorm.variance_epsilon)
        delta = mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
    return add_rms_norm(h, delta, decoder.norm.weight, decoder.norm.variance_epsilon)
