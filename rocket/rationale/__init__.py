"""Rationale generation Φ: K-shot items with the gold answer followed by a generated rationale, the
reasoning K-shot file on which perplexity is scored."""
from rocket.rationale.generate import RATIONALE_PROMPT, generate_rationales, write_rationales

__all__ = ["RATIONALE_PROMPT", "generate_rationales", "write_rationales"]
