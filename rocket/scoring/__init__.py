"""Stage 1 (score): reasoning perplexity and exact-match accuracy of every adapter of a bank."""
from rocket.scoring.score import score_adapters

__all__ = ["score_adapters"]
