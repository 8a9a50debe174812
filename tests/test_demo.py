"""`rocket demo` at the test size recovers the planted structure (CPU, torch reference paths)."""
import json

import pytest

from rocket.demo import NEAR_COPY, RELATED, checks, run_demo


@pytest.fixture(scope="module")
def demo(demo_world):
    mp = pytest.MonkeyPatch()
    # the demo is about the pipeline's result, not the kernels (tested on their own): run the CPU
    # reference paths instead of the Triton interpreter that conftest turns on
    mp.setenv("TRITON_INTERPRET", "0")
    try:
        yield run_demo(demo_world, "small", seed=0, progress=False, log=lambda *a: None)
    finally:
        mp.undo()


def test_demo_recovers_planted_structure(demo):
    r = demo["result"]
    assert set(r["ranking"][:3]) == set(RELATED) | {NEAR_COPY[0]}, r["ranking"]
    assert len(r["experts"]) == 3 and not set(NEAR_COPY) <= set(r["experts"])   # Alg. 1 rejects the near-copy
    assert r["near_copy_cos"] > 0.95
    assert set(RELATED) <= {NEAR_COPY[1] if e == NEAR_COPY[0] else e for e in r["experts"]}
    assert r["related_fraction"] >= 0.8 > r["pool_related_fraction"]
    assert r["planted_pairs_retrieved"] > 0 and r["planted_pairs_both_kept"] == 0
    assert r["moe_loss"] < r["best_adapter_loss"] < r["base_loss"]
    assert all(demo["checks"].values()), demo["checks"]


def test_checks_fail_when_structure_is_wrong(demo):
    truth = {"related": list(RELATED), "near_copy": list(NEAR_COPY)}
    bad = dict(demo["result"], ranking=["caesar", "count"] + list(RELATED), moe_loss=1e9, experts=list(NEAR_COPY))
    ok = checks(bad, truth)
    assert not ok["the related adapters (and the near-copy) rank first by PPL_R"]
    assert not ok["MoE held-out loss < best single adapter"]
    assert not ok["diversity rejects the near-copy: it is never chosen beside its original"]
    assert not ok["the chosen experts cover both related tasks"]


def test_demo_writes_report_and_summary(demo):
    run = demo["run_dir"]
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4   # heatmap, similarity, training curve, routing
    assert "what was planted" in html and "PPL_R" in html
    saved = json.loads((run / "demo.json").read_text())
    assert saved["checks"] == demo["checks"]
    routing = json.loads((run / "routing.json").read_text())
    assert routing["counts"] and all(sum(map(sum, c)) > 0 for c in routing["counts"].values())
