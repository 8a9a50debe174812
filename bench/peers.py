"""Peers that rocket's kernels are measured against. They reuse the test references
(kernels/reference.py) wherever the reference is itself the peer's algorithm."""
from rocket.kernels import reference as R

# Dedup: the blocked torch matmul join (the exact rule, one [block, n] similarity tile at a time).
dedup_blocked_torch = R.dedup
