"""Stage 3 (augment): embed open data, keep the items nearest the K-shot set, remove near-duplicates."""
from rocket.augment.embed import embed_texts
from rocket.augment.deduplicate import dedup
from rocket.augment.build import select_data

__all__ = ["dedup", "embed_texts", "select_data"]
