"""Adapter weights to the GPU without stalling it.

Stacking the whole bank on the host before the first pass (zero-fill, copy, then a transfer from
pageable memory: 640 MB on one CPU thread for the scoring benchmark) was the gap between the public
scoring call and its GPU passes (~300 ms of 1.9 s on an H200). Instead each adapter's matrices, cast
to the model's dtype, are gathered into one pinned host buffer by worker threads while the GPU runs
earlier adapters, copied on a side stream, and the compute stream waits only on that copy.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rocket.adapters.bank import LoraAdapter


@dataclass
class StackedModule:
    """One module's adapters stacked for kernels: ranks zero-padded to the largest."""
    A: torch.Tensor          # [N, r_max, d_in]
    B: torch.Tensor          # [N, d_out, r_max]
    scaling: torch.Tensor    # [N] float32, 0 where an adapter does not cover the module
    present: torch.Tensor    # [N] bool


class AdapterStager:
    """Per-adapter LoRA weights {module: (A [r, d_in], B [d_out, r])} in the dtype and on the device of
    `targets[module]` (a tensor: the layer's weight), for the modules the adapter covers.

    `get(a)` returns them ready for use on the current stream and prepares the next `ahead` adapters
    in the background. On CPU (or modules spread over devices/dtypes) it simply casts and moves."""

    def __init__(self, adapters: list[LoraAdapter], targets: dict[str, torch.Tensor], ahead: int = 2):
        self.adapters = adapters
        self.modules = list(targets)
        self.targets = targets
        kinds = {(t.device, t.dtype) for t in targets.values()}
        self.device, self.dtype = kinds.pop() if len(kinds) == 1 else (None, None)
        self.staged = self.device is not None and self.device.type == "cuda"
        self.ahead = ahead
        self._host: dict[int, Future] = {}
        self._device: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        if self.staged:
            self._pool = ThreadPoolExecutor(max(1, min(ahead, 8)), thread_name_prefix="rocket-stage")
            self._stream = torch.cuda.Stream(self.device)
            for b in range(min(ahead, len(adapters))):  # start now: the caller has set-up work of its own
                self._host[b] = self._pool.submit(self._gather, b)

    def _layout(self, a: int):
        """(module, offset of A, A's shape, offset of B, B's shape) in adapter a's flat buffer, and its size."""
        out, off = [], 0
        for n in self.modules:
            if n in self.adapters[a].weights:
                A, B = self.adapters[a].weights[n]
                out.append((n, off, A.shape, off + A.numel(), B.shape))
                off += A.numel() + B.numel()
        return out, off

    def _gather(self, a: int) -> torch.Tensor:
        """Worker thread: adapter a's matrices, cast, in one pinned buffer (torch copies release the GIL)."""
        layout, size = self._layout(a)
        buf = torch.empty(size, dtype=self.dtype, pin_memory=True)
        weights = self.adapters[a].weights
        for n, oa, sa, ob, sb in layout:
            A, B = weights[n]
            buf[oa:oa + A.numel()].view(sa).copy_(A)
            buf[ob:ob + B.numel()].view(sb).copy_(B)
        return buf

    def _to_device(self, a: int, wait: bool = True) -> None:
        """Start adapter a's host→device copy (if its gather is done, unless `wait`)."""
        if a in self._device or not 0 <= a < len(self.adapters):
            return
        if a not in self._host:
            self._host[a] = self._pool.submit(self._gather, a)
        if not wait and not self._host[a].done():
            return
        host = self._host.pop(a).result()
        with torch.cuda.stream(self._stream):
            dev = host.to(self.device, non_blocking=True)  # the host allocator keeps `host` until the copy is done
            done = torch.cuda.Event()
            done.record(self._stream)
        self._device[a] = (dev, done)

    def get(self, a: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not self.staged:
            return {n: tuple(w.to(device=self.targets[n].device, dtype=self.targets[n].dtype).contiguous() for w in AB)
                    for n, AB in self.adapters[a].weights.items() if n in self.targets}
        self._to_device(a)
        for b in range(a + 1, min(a + 1 + self.ahead, len(self.adapters))):
            if b not in self._host and b not in self._device:
                self._host[b] = self._pool.submit(self._gather, b)
        dev, done = self._device.pop(a)
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        dev.record_stream(stream)  # allocated on the side stream, read on this one
        self._to_device(a + 1, wait=False)  # then its transfer overlaps adapter a's work
        layout, _ = self._layout(a)
        return {n: (dev[oa:oa + sa.numel()].view(sa), dev[ob:ob + sb.numel()].view(sb))
                for n, oa, sa, ob, sb in layout}

    def close(self) -> None:
        if self.staged:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._host.clear()
            self._device.clear()


def stack_modules(adapters: list[LoraAdapter], targets: dict[str, torch.Tensor], group: int = 16) -> dict[str, StackedModule]:
    """Every module of `targets` stacked over `adapters`: A [N, r_max, d_in], B [N, d_out, r_max] in the
    target's dtype, ranks zero-padded, zeros with scaling 0 and present=False where an adapter lacks
    the module (LoraBank.stack is this for one module). Assembled where `targets` live: adapters
    arrive through an AdapterStager and each module gets `group` adapters per write (one stack
    kernel when they all cover it at the full rank)."""
    N = len(adapters)
    device = next(iter(targets.values())).device
    # one small transfer for all scalings and coverage flags
    scaling = torch.tensor([[a.scalings[n] if n in a.weights else 0.0 for a in adapters] for n in targets],
                           dtype=torch.float32).to(device)
    present = torch.tensor([[n in a.weights for a in adapters] for n in targets], dtype=torch.bool).to(device)
    out = {}
    for i, (n, t) in enumerate(targets.items()):
        ranks = [a.rank(n) if n in a.weights else 0 for a in adapters]
        r_max, (d_out, d_in) = max(ranks), t.shape
        new = torch.empty if min(ranks) == r_max else torch.zeros  # padding and absent adapters stay 0
        out[n] = StackedModule(new(N, r_max, d_in, dtype=t.dtype, device=t.device),
                               new(N, d_out, r_max, dtype=t.dtype, device=t.device), scaling[i].to(t.device),
                               present[i].to(t.device))
    stager = AdapterStager(adapters, targets, ahead=4)
    try:
        for g0 in range(0, N, group):
            ws = [stager.get(a) for a in range(g0, min(g0 + group, N))]
            for n, st in out.items():
                r_max = st.A.shape[1]
                if all(n in w and w[n][0].shape[0] == r_max for w in ws):
                    torch.stack([w[n][0] for w in ws], out=st.A[g0:g0 + len(ws)])
                    torch.stack([w[n][1] for w in ws], out=st.B[g0:g0 + len(ws)])
                    continue
                for i, w in enumerate(ws):
                    if n in w:
                        A, B = w[n]
                        st.A[g0 + i, :A.shape[0]].copy_(A)
                        st.B[g0 + i, :, :A.shape[0]].copy_(B)
    finally:
        stager.close()
    return out
