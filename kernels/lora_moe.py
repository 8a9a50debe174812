"""LoRA mixture of experts: y = x Wᵀ + b + Σ_{(e,w) in topk(x)} w · s_e · B_e A_e x (DESIGN §3).

The reference (kernels/reference.py: lora_moe, route_topk) is the CPU path and the oracle.
"""
from __future__ import annotations

import torch

from rocket.kernels import reference as R
from rocket.kernels import use_triton


def lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora=None,
             return_routing: bool = False):
    """Same contract as reference.lora_moe. With return_routing, returns (y, probs [T, E] float32,
    experts [T, k] int64) where probs carries gradients to x and the router (load-balancing loss)."""
    if not use_triton(x, weight, lora_A, lora_B, router_weight):
        y = R.lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora)
        if not return_routing:
            return y
        _, experts, probs = R.route_topk(x.reshape(-1, x.shape[-1]), router_weight, top_k)
        return y, probs, experts
    return _lora_moe_triton(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora,
                            return_routing)


def _lora_moe_triton(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora, return_routing):
    # placeholder until the fused kernels land: the reference, on any device
    y = R.lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora)
    if not return_routing:
        return y
    _, experts, probs = R.route_topk(x.reshape(-1, x.shape[-1]), router_weight, top_k)
    return y, probs, experts
