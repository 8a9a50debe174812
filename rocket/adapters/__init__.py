"""Shared adapter layer: the LoRA bank (peft adapters), stacked per-module tensors, ΔW similarity."""
from rocket.adapters.bank import LoraAdapter, LoraBank, load_adapter
from rocket.adapters.similarity import group_similarity

__all__ = ["LoraAdapter", "LoraBank", "group_similarity", "load_adapter"]
