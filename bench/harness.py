"""Benchmark harness: same-process timings of rocket and its peers, written as JSON results.

On CUDA, times are medians of `triton.testing.do_bench` (CUDA events, warm-up, L2 flush); on the
CPU, medians of wall-clock repeats. Each `record` row holds one shape with rocket and its peers.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from rocket.io import write_json

# ROCKET_BENCH_RESULTS redirects the JSON (e.g. to $OUT on the device machine); ROCKET_COMMIT names the
# commit where the tree travels without its .git.
RESULTS = Path(os.environ.get("ROCKET_BENCH_RESULTS", Path(__file__).parent / "results"))


def median_ms(fn, device: torch.device | str, warmup: int = 3, reps: int = 10) -> float:
    """Median time of fn() in milliseconds on `device`."""
    if torch.device(device).type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def interleaved_median_ms(fns: dict, device: torch.device | str, rounds: int = 3, **cpu_reps) -> dict[str, float]:
    """Median time in ms of each fn of `fns` (name → fn), for ratios between them. On CUDA, `rounds`
    rounds each time every fn once in turn, and each fn's result is the median of its rounds. A GPU's
    clocks follow its power draw within milliseconds, so a fn timed right after another one runs at
    that one's clocks: each timing first runs its fn for 100 ms (its own steady state), then takes
    the do_bench median over 50 ms. On the CPU, median_ms of each (`cpu_reps`: its warmup and reps)."""
    if torch.device(device).type != "cuda":
        return {name: median_ms(fn, device, **cpu_reps) for name, fn in fns.items()}
    import triton.testing
    per_round = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(float(triton.testing.do_bench(fn, warmup=100, rep=50, return_mode="median")))
    return {name: statistics.median(times) for name, times in per_round.items()}


def peak_memory(fns: dict, device) -> dict | None:
    """Per fn of `fns` (name → fn): the peak GPU memory of one call, in GiB, and what was allocated
    before it (`resident_gib`, the same for every fn: inputs and models the row shares), or None on
    the CPU. The torch allocator's count: memory other libraries allocate themselves is not in it."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    out = {"resident_gib": torch.cuda.memory_allocated() / 2 ** 30}
    for name, fn in fns.items():
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        out[name] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def timed(fn, device):
    """(seconds, peak GPU memory in GiB or None on the CPU, result) of one call of fn(): for work of
    seconds to minutes, where do_bench's many repetitions do not fit."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return time.perf_counter() - t, peak, out


def host_wall(step, n: int = 15) -> tuple[float, float]:
    """(median host issue ms, median wall ms) of step() on the GPU: issue = until step() returns,
    wall = until the device is done. Issue near wall means the host bounds the step."""
    issue, wall = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        issue.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(issue), 1e3 * statistics.median(wall)


def cuda_graph(fn):
    """fn() captured in a CUDA graph, returned as the graph's replay (GPU only). fn runs twice first on
    a side stream, as torch.cuda.graphs asks (kernels compile and tune there). Timing the replay
    leaves out the host's cost of issuing fn's launches: what the GPU itself takes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    if os.environ.get("ROCKET_COMMIT"):
        return os.environ["ROCKET_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Recorder:
    """Collects rows of one suite and writes bench/results/<suite>-<device>-<date>.json."""

    def __init__(self, suite: str, writes: bool = True):
        self.suite, self.writes = suite, writes  # writes: timings are results (not CI's correctness run)
        self.rows: list[dict] = []
        self.device = None
        self.path: Path | None = None  # chosen at the first write; later writes replace it

    def checkpoint(self) -> None:
        """Write the rows so far now: a long suite stopped by a time limit, or a process that dies in a
        peer, keeps what finished."""
        if self.writes:
            self.write()

    def record(self, device, shape: dict, medians_ms: dict[str, float], baseline: str | None = None, **extra):
        self.device = device_name(device)
        row = {"shape": shape, "median_ms": medians_ms, **extra}
        if baseline is not None:
            row["ratio_to_" + baseline] = {k: v / medians_ms[baseline] for k, v in medians_ms.items()}
        self.rows.append(row)
        return row

    def write(self, directory: Path = RESULTS) -> Path | None:
        if not self.rows:
            return None
        now = datetime.now(timezone.utc)
        if self.path is None or self.path.parent != directory:
            kind = "gpu" if "cpu" not in (self.device or "cpu") else "cpu"
            self.path = directory / f"{self.suite}-{kind}-{now:%Y%m%d-%H%M%S}.json"
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"suite": self.suite, "device": self.device, "date": now.isoformat(timespec="seconds"),
                   "commit": git_commit(), "torch": torch.__version__, "rows": self.rows}
        write_json(self.path, payload, indent=2)
        return self.path
