"""Shared runtime: many adapters on one model (SGMV rows or merged weights), the packed Llama
forward, batched greedy generation with answer extractors. Used by scoring (and evaluation)."""
