"""rocket.staging.AdapterStager: each adapter's weights, cast to the layer dtype, on the layer device —
equal to the bank's own tensors cast the same way, in any call order; stack_modules: the stacked layout."""
from pathlib import Path

import pytest
import torch

from rocket.adapters.bank import LoraAdapter, LoraBank
from rocket.adapters.stacking import AdapterStager, stack_modules
from tests.helpers import assert_stacked

MODULES = {"m.q": (24, 40), "m.up": (24, 56), "m.down": (56, 24)}  # name: (d_in, d_out), odd sizes


def _bank(seed=0, spec=((4, MODULES), (8, ["m.q", "m.down"]), (2, MODULES), (16, MODULES))):
    """(rank, covered modules) per adapter; by default mixed ranks, an adapter without 'm.up', and one
    non-contiguous (transposed) matrix in adapter 2. float32 weights."""
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    for i, (r, covered) in enumerate(spec):
        w = {}
        for n in covered:
            d_in, d_out = MODULES[n]
            A = torch.randn(r, d_in, generator=gen)
            B = torch.randn(r, d_out, generator=gen).t() if i == 2 else torch.randn(d_out, r, generator=gen)
            w[n] = (A, B)
        adapters.append(LoraAdapter(f"a{i}", Path("."), r, 2.0 * r, False, w, {n: 2.0 for n in w}))
    return LoraBank(adapters)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stager_returns_each_adapters_weights_cast(device, dtype):
    bank = _bank()
    targets = {n: torch.empty(d_out, d_in, dtype=dtype, device=device) for n, (d_in, d_out) in MODULES.items()}
    stager = AdapterStager(bank.adapters, targets, ahead=2)
    try:
        for a in [0, 1, 2, 3, 0, 1, 3, 2, 2]:  # in order (prefetched), again, out of order, repeated
            got = stager.get(a)
            want = bank[a].weights
            assert set(got) == set(want)
            for n, (A, B) in got.items():
                assert A.device.type == device and A.dtype == dtype and A.is_contiguous() and B.is_contiguous()
                assert torch.equal(A.cpu(), want[n][0].to(dtype)) and torch.equal(B.cpu(), want[n][1].to(dtype))
    finally:
        stager.close()


@pytest.mark.gpu
def test_stager_weights_stay_valid_while_later_adapters_stream_in():
    """Tensors of adapter a are read on the compute stream after adapters a+1.. were staged (side stream,
    reused memory): their values must not change."""
    bank = _bank(1)
    targets = {n: torch.empty(d_out, d_in, dtype=torch.bfloat16, device="cuda") for n, (d_in, d_out) in MODULES.items()}
    stager = AdapterStager(bank.adapters, targets, ahead=1)
    try:
        sums = []
        for a in range(len(bank)):
            w = stager.get(a)
            torch.cuda._sleep(20_000_000)  # keep the compute stream busy while the next adapter is staged
            sums.append({n: (A.float() @ A.float().t()).sum() + B.float().sum() for n, (A, B) in w.items()})
        for a, s in enumerate(sums):
            for n, v in s.items():
                A, B = (t.to(torch.bfloat16).float() for t in bank[a].weights[n])
                assert torch.allclose(v.cpu(), (A @ A.t()).sum() + B.sum(), rtol=1e-5, atol=1e-3)
    finally:
        stager.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("group", [1, 2, 16])
@pytest.mark.parametrize("uniform", [False, True])
def test_stack_modules_layout(device, group, uniform):
    """Every module, adapters in groups: mixed ranks and a missing module (padded copies), or one rank
    everywhere (one stack per group and module)."""
    bank = _bank(2, [(4, MODULES)] * 5) if uniform else LoraBank(_bank(2).adapters + _bank(3).adapters[2:])
    targets = {n: torch.empty(d_out, d_in, dtype=torch.bfloat16, device=device) for n, (d_in, d_out) in MODULES.items()}
    got = stack_modules(bank.adapters, targets, group=group)
    assert list(got) == list(targets)
    for n, st in got.items():
        assert st.A.device.type == device
        assert_stacked(st, bank.adapters, n, torch.bfloat16)
