"""pytest-benchmark suites of rocket. Run: `pytest bench --benchmark-enable` (GPU shapes on CUDA,
small shapes on the CPU); each suite writes its rows to bench/results/ as JSON."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # CPU: Triton kernels in the interpreter, at small shapes
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # harness, peers, cases

from bench.harness import Recorder  # noqa: E402

_RECORDERS: dict[str, Recorder] = {}


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def on_gpu(device):
    return device.type == "cuda"


def _timings_are_results(config) -> bool:
    opt = config.getoption
    return not (opt("benchmark_disable", False) and not opt("benchmark_enable", False))  # not CI's correctness run


@pytest.fixture
def recorder(request):
    """One Recorder per suite (module), written at the end of the session (and by its `checkpoint`)."""
    suite = Path(request.node.fspath).stem.removeprefix("test_")
    return _RECORDERS.setdefault(suite, Recorder(suite, writes=_timings_are_results(request.config)))


def pytest_sessionfinish(session, exitstatus):
    if not _timings_are_results(session.config):
        return
    for rec in _RECORDERS.values():
        path = rec.write()
        if path is not None:
            print(f"\nbench results: {path}")
