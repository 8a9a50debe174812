"""Stage 2 (select): rank aggregation, top-M, the best and most diverse N-tuple of adapters."""
from rocket.selection.ranking import Selection, select_experts

__all__ = ["Selection", "select_experts"]
