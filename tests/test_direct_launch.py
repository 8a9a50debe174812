"""rocket.kernels.direct_launch: the cache of compiled kernels and when it is used. A compiled
Triton kernel exists only on a GPU (tests/test_lora_moe_kernel.py checks real direct launches there
against JIT launches, bit for bit); here a stand-in JIT function records what would be launched."""
from types import SimpleNamespace

import pytest
import torch

from rocket.kernels import direct_launch as D


class _Compiled:
    """What Triton's JIT launch returns: a compiled kernel whose `run` takes the grid, the stream,
    the function handle, metadata, hooks, then every kernel argument."""
    function, packed_metadata = "fn", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, g0, g1, g2, stream, function, metadata, launch_meta, enter, exit_, *args):
        self.log.append(("direct", (g0, g1, g2), args))


class _Jit:
    """A @triton.jit stand-in with parameters (x_ptr, n, BLOCK: constexpr, FLAG: constexpr = 7)."""
    params = [SimpleNamespace(name=n, default=d) for n, d in (("x_ptr", None), ("n", None), ("BLOCK", None),
                                                              ("FLAG", 7))]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return _Compiled(self.log)
        return launch


def _launch(L, x, n, block=32):
    L.launch(("key", block), lambda m: (-(-n // m["BLOCK"]),), (x, n), lambda: dict(BLOCK=block, num_warps=4), 0)


@pytest.fixture
def setup(monkeypatch):
    """(stand-in kernel, its Launcher, a tensor argument) with the stream lookup stubbed out."""
    monkeypatch.setattr(D, "_raw_stream", lambda index: 123)
    kernel = _Jit()
    return kernel, D.Launcher(kernel), torch.zeros(64)


def test_second_launch_is_direct_with_every_argument(setup):
    kernel, L, x = setup
    _launch(L, x, 64)
    _launch(L, x, 64)
    assert [e[0] for e in kernel.log] == ["jit", "direct"] and L.direct_launches == 1
    assert kernel.log[1][1] == (2, 1, 1) and kernel.log[1][2] == (x, 64, 32, 7)  # constexprs and defaults appended


def test_new_specialisation_goes_through_jit(setup):
    kernel, L, x = setup
    for args in [(x, 64), (x, 40), (x[1:], 64), (x.double(), 64), (x, 1), (x, 64), (x, 40)]:
        _launch(L, *args)
    # 64 vs 40 (divisible by 16 or not), a misaligned view, another dtype, n == 1: each compiles once
    assert [e[0] for e in kernel.log] == ["jit"] * 5 + ["direct"] * 2


def test_hooks_and_other_launchers_take_the_jit_path(setup, monkeypatch):
    kernel, L, x = setup
    _launch(L, x, 64)
    with monkeypatch.context() as m:
        m.setattr(D, "_hooks_idle", lambda: False)  # a profiler's launch hook is set
        _launch(L, x, 64)

    def other_signature(self, *a):
        raise TypeError("launcher takes other arguments")
    monkeypatch.setattr(_Compiled, "run", other_signature)
    _launch(L, x, 64)  # fails before launching, falls back, and stays on the JIT path
    _launch(L, x, 64)
    assert [e[0] for e in kernel.log] == ["jit"] * 4 and not L.direct and L.direct_launches == 0


def test_idle_hooks():
    assert D._idle(None) and D._idle(SimpleNamespace(calls=[])) and not D._idle(SimpleNamespace(calls=[print]))
    assert not D._idle(print)
