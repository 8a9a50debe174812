"""Stage 2: ΔW similarity via r×r traces, rank aggregation, tuple choice, the `rocket select` CLI."""
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from scipy.stats import rankdata

from rocket.adapters.bank import LoraAdapter, LoraBank
from rocket.cli import main as cli_main
from rocket.kernels import reference
from rocket.data.scores import Scores
from rocket.errors import SelectionError
from rocket.selection.ranking import combinations, rank_min, select_experts, tuple_similarity
from rocket.adapters.similarity import group_similarity

MODULES = ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.mlp"]
SHAPES = {"layers.0.q": (24, 24), "layers.0.v": (24, 12), "layers.1.q": (24, 24), "layers.1.mlp": (24, 40)}


def random_bank(n, seed, dtype=torch.float32, ranks=(1, 3, 4, 8), coverage=0.8, zero_b=False) -> LoraBank:
    """In-memory adapters of mixed ranks, scalings and module coverage (each covers ≥ 1 module)."""
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for i in range(n):
        mods = [m for m in MODULES if torch.rand(1, generator=g) < coverage] or [MODULES[i % len(MODULES)]]
        weights, scalings = {}, {}
        for m in mods:
            r = ranks[int(torch.randint(len(ranks), (1,), generator=g))]
            d_in, d_out = SHAPES[m]
            weights[m] = (torch.randn(r, d_in, generator=g).to(dtype), torch.randn(d_out, r, generator=g).to(dtype))
            scalings[m] = float(torch.rand(1, generator=g)) * 4 + 0.1
        if zero_b and i == 1:  # an untrained module: ΔW = 0
            A, B = weights[mods[0]]
            weights[mods[0]] = (A, torch.zeros_like(B))
        adapters.append(LoraAdapter(f"ad{i:02d}", Path(f"/bank/ad{i:02d}"), 8, 16.0, False, weights, scalings))
    return LoraBank(adapters)


def explicit_cos(bank: LoraBank) -> torch.Tensor:
    """Brute force: form every ΔW = s·B·A in float64, cosine per shared non-zero module, mean."""
    n = len(bank)
    out = torch.full((n, n), float("nan"), dtype=torch.float64)
    for i, j in itertools.product(range(n), repeat=2):
        a, b = bank[i], bank[j]
        vals = []
        for m in sorted(set(a.weights) & set(b.weights)):
            Wi = a.scalings[m] * a.weights[m][1].double() @ a.weights[m][0].double()
            Wj = b.scalings[m] * b.weights[m][1].double() @ b.weights[m][0].double()
            if Wi.norm() > 0 and Wj.norm() > 0:
                vals.append(float((Wi * Wj).sum() / (Wi.norm() * Wj.norm())))
        if vals:
            out[i, j] = sum(vals) / len(vals)
    return out


def assert_same_nan(out, ref, atol):
    assert torch.equal(out.isnan(), ref.isnan())
    assert (out - ref).nan_to_num().abs().max() <= atol


# --------------------------------------------------------------------------- similarity
@pytest.mark.filterwarnings("ignore:group_similarity")  # the zero-ΔW adapter shares nothing with some
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("block_rows", [4096, 5])  # one Gram tile; many tiles (and a partial one)
def test_trace_formula_equals_explicit_cosine(dtype, atol, block_rows):
    bank = random_bank(11, seed=3, dtype=dtype, zero_b=True)
    out = group_similarity(bank, device="cpu", block_rows=block_rows)
    assert out.dtype == torch.float64 and out.shape == (11, 11)
    assert_same_nan(out, explicit_cos(bank), atol)
    assert torch.equal(out.nan_to_num(), out.nan_to_num().T)


def test_pair_inner_products_match_reference_trace():
    """The Gram block sums equal rocket/kernels/reference.lora_delta_inner on every pair of one module."""
    from rocket.adapters.similarity import _block_inner, _stack_rows
    bank = random_bank(7, seed=5, dtype=torch.float64, coverage=1.0)
    m = MODULES[3]
    XA, XB, r = _stack_rows(bank.adapters, list(range(7)), m, torch.device("cpu"))
    inner = _block_inner(XA, XB, r, block_rows=3 * r)
    for i, j in itertools.product(range(7), repeat=2):
        (Ai, Bi), (Aj, Bj) = bank[i].weights[m], bank[j].weights[m]
        assert inner[i, j].item() == pytest.approx(reference.lora_delta_inner(Ai, Bi, Aj, Bj).item(), rel=1e-12)


def test_pairs_sharing_no_module_are_nan_and_reported():
    g = torch.Generator().manual_seed(0)
    def adapter(name, mods):
        w = {m: (torch.randn(2, SHAPES[m][0], generator=g), torch.randn(SHAPES[m][1], 2, generator=g)) for m in mods}
        return LoraAdapter(name, Path(name), 2, 4.0, False, w, {m: 2.0 for m in mods})
    bank = LoraBank([adapter("q_only", [MODULES[0]]), adapter("v_only", [MODULES[1]]),
                     adapter("both", MODULES[:2])])
    with pytest.warns(UserWarning, match="q_only/v_only"):
        out = group_similarity(bank, device="cpu")
    assert math.isnan(out[0, 1]) and math.isnan(out[1, 0])
    assert_same_nan(out, explicit_cos(bank), 1e-6)


def test_mismatched_module_shapes_are_refused():
    bank = random_bank(3, seed=1, coverage=1.0)
    A, B = bank[2].weights[MODULES[0]]
    bank[2].weights[MODULES[0]] = (torch.randn(A.shape[0], 7), B)
    with pytest.raises(Exception, match=r"ad02.*layers\.0\.q.*7→24"):
        group_similarity(bank, device="cpu")


# --------------------------------------------------------------------------- ranks and tuples
def test_rank_min_matches_scipy():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 7.0, 3.0])
    assert rank_min(x).tolist() == rankdata(x.numpy(), method="min").astype(int).tolist()
    y = torch.randn(200, dtype=torch.float64).round(decimals=1)
    assert rank_min(y).tolist() == rankdata(y.numpy(), method="min").astype(int).tolist()


@pytest.mark.parametrize("m,k", [(8, 4), (9, 1), (6, 6), (12, 5), (5, 2)])
def test_combinations_are_lexicographic(m, k):
    assert combinations(m, k).tolist() == [list(c) for c in itertools.combinations(range(m), k)]


def test_tuple_similarity_ties_exactly_across_pair_orders():
    s = torch.tensor([[1, .1, .2, .3], [.1, 1, .3, .2], [.2, .3, 1, .1], [.3, .2, .1, 1]], dtype=torch.float64)
    t = combinations(4, 3)
    sims = tuple_similarity(s, t)
    assert len(set(sims.tolist())) == 1  # every triple has pair values {.1, .2, .3}
    assert sims[0].item() == pytest.approx(0.2)


def brute_force_choice(scores, bank, acc, top_m, n_experts):
    """The objective of docs/design.md evaluated tuple by tuple, independently of rocket.selection."""
    names = bank.names
    ppl = scores.ppl_sum.numpy()
    r_p = rankdata(ppl, method="min").astype(int)
    r_a = rankdata(-acc.numpy(), method="min").astype(int) if acc is not None else [0] * len(names)
    total = [int(p + a) for p, a in zip(r_p, r_a)]
    top = sorted(sorted(range(len(names)), key=lambda k: (total[k], r_p[k], k))[:top_m])
    cos = explicit_cos(bank).nan_to_num(0.0)
    tuples = list(itertools.combinations(top, n_experts))
    sims = [sum(abs(cos[i, j].item()) for i, j in itertools.combinations(t, 2)) / math.comb(n_experts, 2)
            for t in tuples]
    r_d = rankdata(sims, method="min").astype(int)
    objective = [sum(total[k] for k in t) + int(r) for t, r in zip(tuples, r_d)]
    best = min(range(len(tuples)), key=lambda x: (objective[x], tuples[x]))
    return [names[k] for k in tuples[best]], objective[best], sorted(objective)


@pytest.mark.parametrize("seed", range(6))
def test_choice_equals_brute_force(seed):
    n = 9 + seed
    bank = random_bank(n, seed=100 + seed, coverage=0.7)
    g = torch.Generator().manual_seed(seed)
    # coarse values so that R_P, R_A and rank sums tie often
    loss = (torch.randint(0, 4, (n, 3), generator=g) * 0.25).double()
    acc = (torch.randint(0, 4, (n,), generator=g) / 4).double() if seed % 3 else None
    scores = Scores(bank.names, loss, acc)
    top_m, n_exp = [(8, 4), (6, 3), (n, 2)][seed % 3]
    sel = select_experts(scores, bank, top_m=top_m, n_experts=n_exp, device="cpu")
    experts, objective, all_objectives = brute_force_choice(scores, bank, acc, top_m, n_exp)
    assert sel.experts == experts
    assert int(sel.objective[sel.best]) == objective
    assert sorted(sel.objective.tolist()) == all_objectives
    assert sel.uses_accuracy == (acc is not None)
    assert [r["name"] for r in sel.table] == bank.names and sum(r["chosen"] for r in sel.table) == n_exp
    assert sel.paths == [str(bank[n].path) for n in sel.experts]   # in-memory adapters: no weights file


def test_accuracy_argument_overrides_scores():
    bank = random_bank(6, seed=7)
    loss = torch.linspace(0.1, 1.0, 6).double().unsqueeze(1)
    scores = Scores(bank.names, loss, torch.zeros(6))
    acc = {n: float(i == 5) for i, n in enumerate(bank.names)}   # the worst-perplexity adapter is most accurate
    sel = select_experts(scores, bank, acc=acc, top_m=3, n_experts=2, device="cpu")
    rows = {r["name"]: r for r in sel.table}
    assert rows["ad05"]["R_A"] == 1 and rows["ad00"]["R_A"] == 2 and rows["ad05"]["R_P"] == 6
    exp, _, _ = brute_force_choice(scores, bank, torch.tensor([acc[n] for n in bank.names]), 3, 2)
    assert sel.experts == exp


# --------------------------------------------------------------------------- tie rules
def identical_bank(n) -> LoraBank:
    g = torch.Generator().manual_seed(0)
    w = {MODULES[0]: (torch.randn(2, 24, generator=g), torch.randn(24, 2, generator=g))}
    return LoraBank([LoraAdapter(f"same{i}", Path(f"same{i}"), 2, 4.0, False, dict(w), {MODULES[0]: 2.0})
                     for i in range(n)])


def test_ties_everywhere_choose_the_lexicographically_smallest_tuple():
    bank = identical_bank(7)
    scores = Scores(bank.names, torch.ones(7, 2, dtype=torch.float64), torch.full((7,), 0.5))
    sel = select_experts(scores, bank, top_m=5, n_experts=3, device="cpu")
    assert all(r["R_P"] == 1 and r["R_A"] == 1 for r in sel.table)      # ties share the smallest rank
    assert sel.top == ["same0", "same1", "same2", "same3", "same4"]        # top M by adapter order
    assert torch.all(sel.r_d == 1)                                         # equal similarities tie in R_D
    assert sel.experts == ["same0", "same1", "same2"]


def test_top_m_ties_broken_by_lower_rp_then_adapter_order():
    bank = identical_bank(5)
    # R_P: a0=5, a1=4, a2=3, a3=2, a4=1; R_A: a0=1, a1=2, a2=3, a3=4, a4=5 → every R_P + R_A is 6
    scores = Scores(bank.names, torch.arange(4, -1, -1).double().unsqueeze(1), 1 - torch.arange(5).double() / 4)
    sel = select_experts(scores, bank, top_m=2, n_experts=2, device="cpu")
    assert [r["rank_sum"] for r in sel.table] == [6] * 5
    assert [r["top_m"] for r in sel.table] == [None, None, None, 2, 1] and sel.top == ["same3", "same4"]
    # equal R_P + R_A and equal R_P: adapter (bank) order decides
    scores = Scores(bank.names, torch.tensor([[1.0], [0.0], [0.0], [0.0], [1.0]]).double(),
                    torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]).double())
    sel = select_experts(scores, bank, top_m=2, n_experts=2, device="cpu")
    assert [r["rank_sum"] for r in sel.table] == [5, 4, 4, 4, 5]
    assert sel.top == ["same1", "same2"]


def test_diversity_breaks_rank_ties_toward_least_similar():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 24, generator=g), torch.randn(24, 2, generator=g)
    near = (A + 0.01 * torch.randn(2, 24, generator=g), B)
    far = (torch.randn(2, 24, generator=g), torch.randn(24, 2, generator=g))
    bank = LoraBank([LoraAdapter(n, Path(n), 2, 4.0, False, {MODULES[0]: w}, {MODULES[0]: 2.0})
                     for n, w in [("base", (A, B)), ("near", near), ("far", far)]])
    scores = Scores(bank.names, torch.ones(3, 1, dtype=torch.float64))   # all ranks tie: R_D decides
    sel = select_experts(scores, bank, top_m=3, n_experts=2, device="cpu")
    assert sel.experts in (["base", "far"], ["near", "far"]) and sel.r_d[sel.best] == 1
    assert not sel.uses_accuracy and any("R_A omitted" in n for n in sel.notes)


# --------------------------------------------------------------------------- bad inputs
def _adapter(name, delta_dirs):
    """An adapter on one 6×6 module whose ΔW = B·A is the outer product of the given unit directions."""
    a, b = delta_dirs
    return LoraAdapter(name, Path(f"/bank/{name}"), 1, 1.0, False,
                       {"m": (torch.tensor([a], dtype=torch.float64), torch.tensor([[x] for x in b], dtype=torch.float64))},
                       {"m": 1.0})


def test_diversity_uses_the_absolute_cosine():
    """An anti-aligned partner is as redundant as an aligned one: with |cos| the orthogonal adapter
    is chosen beside 'a', with a signed mean the anti-aligned one would win."""
    e = torch.eye(6, dtype=torch.float64).tolist()
    neg = [-x for x in e[0]]
    bank = LoraBank([_adapter("a", (e[0], e[0])), _adapter("anti", (neg, e[0])), _adapter("ortho", (e[1], e[1]))])
    scores = Scores(bank.names, torch.tensor([[0.1], [0.2], [0.2]], dtype=torch.float64))
    sel = select_experts(scores, bank, top_m=3, n_experts=2, device="cpu")
    assert sel.similarity[0, 1] == pytest.approx(-1.0) and sel.similarity[0, 2] == pytest.approx(0.0)
    assert sel.experts == ["a", "ortho"]


def test_adapters_with_zero_delta_are_set_aside_with_a_warning():
    e = torch.eye(6, dtype=torch.float64).tolist()
    untrained = LoraAdapter("untrained", Path("/bank/untrained"), 1, 1.0, False,
                            {"m": (torch.ones(1, 6, dtype=torch.float64), torch.zeros(6, 1, dtype=torch.float64))},
                            {"m": 1.0})
    bank = LoraBank([_adapter("a", (e[0], e[0])), untrained, _adapter("b", (e[0], e[1])),
                     _adapter("c", (e[2], e[2]))])
    scores = Scores(bank.names, torch.tensor([[0.3], [0.1], [0.3], [0.4]], dtype=torch.float64))  # best PPL
    with pytest.warns(UserWarning, match="ΔW = 0 on every module set aside.*untrained"):
        sel = select_experts(scores, bank, top_m=3, n_experts=2, device="cpu")
    assert "untrained" not in sel.experts and sel.top == ["a", "b", "c"]
    assert any("untrained" in n for n in sel.notes) and not any("share no module" in n for n in sel.notes)
    with pytest.warns(UserWarning), pytest.raises(SelectionError, match="only 1 scored adapters have a non-zero"):
        select_experts(Scores(["a", "untrained"], torch.zeros(2, 1, dtype=torch.float64)),
                       bank.subset([0, 1]), top_m=2, n_experts=2, device="cpu")


def test_the_base_model_row_is_shown_never_selected():
    """A base model better than every adapter stays a reference row: selection ranks the adapters only;
    the tables show it first, unranked, and PPL_R in the one format (two decimals)."""
    bank = random_bank(5, seed=4)
    loss = torch.tensor([[2.0], [1.0], [3.0], [1.5], [2.5]], dtype=torch.float64)
    scores = Scores(bank.names, loss, torch.full((5,), 0.5, dtype=torch.float64),
                    base_loss=torch.tensor([0.1], dtype=torch.float64), base_accuracy=1.0)
    sel = select_experts(scores, bank, top_m=4, n_experts=2, device="cpu")
    assert [r["name"] for r in sel.table] == bank.names and len(sel.experts) == 2
    assert sel.to_json()["base"] == {"ppl_sum": pytest.approx(math.exp(0.1)), "accuracy": 1.0}
    lines = sel.format_table().splitlines()
    assert lines[1].split() == ["(base", "model)", "1.11", "1.000", "-", "-", "-"]
    assert lines[2].split()[:2] == ["ad01", f"{math.exp(1.0):.2f}"]   # the best adapter, R_P 1
    same = select_experts(Scores(bank.names, loss, torch.full((5,), 0.5, dtype=torch.float64)), bank, top_m=4,
                          n_experts=2, device="cpu")
    assert same.experts == sel.experts and same.base is None and "(base model)" not in same.format_table()
    # the accuracy of another file is not comparable with the base model's: its row shows none
    assert select_experts(scores, bank, acc=[0.1, 0.2, 0.3, 0.4, 0.5], top_m=4, n_experts=2,
                          device="cpu").base["accuracy"] is None


def test_bad_inputs_give_clear_errors():
    bank = random_bank(5, seed=2)
    scores = Scores(bank.names[:4] + ["stranger"], torch.rand(5, 2, dtype=torch.float64))
    with pytest.raises(SelectionError, match="not in the bank.*'stranger'"):
        select_experts(scores, bank)
    scores = Scores(bank.names, torch.rand(5, 2, dtype=torch.float64))
    with pytest.raises(SelectionError, match="n_experts=4 > top_m=3"):
        select_experts(scores, bank, top_m=3, n_experts=4)
    with pytest.raises(SelectionError, match="only 5 adapters"):
        select_experts(scores, bank, top_m=8, n_experts=6)
    with pytest.raises(SelectionError, match="positive"):
        select_experts(scores, bank, n_experts=0)
    with pytest.raises(SelectionError, match="accuracy: 3 values for 5"):
        select_experts(scores, bank, acc=[0.1, 0.2, 0.3], top_m=4, n_experts=2)
    with pytest.raises(SelectionError, match="no value for adapter 'ad00'"):
        select_experts(scores, bank, acc={}, top_m=4, n_experts=2)
    nan = Scores(bank.names, torch.tensor([[1.0], [float("nan")], [1.0], [1.0], [1.0]]))
    with pytest.raises(SelectionError, match="PPL_R of 'ad01' is not finite"):
        select_experts(nan, bank, top_m=4, n_experts=2)
    with pytest.raises(SelectionError, match="tuples exceed"):
        _too_many_tuples()


def _too_many_tuples():
    bank = identical_bank(60)
    select_experts(Scores(bank.names, torch.rand(60, 1, dtype=torch.float64)), bank, top_m=60, n_experts=10)


# --------------------------------------------------------------------------- bank paths and the CLI
def _scores_for(names, path: Path, seed=0, accuracy=True):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(len(names), 5, generator=g, dtype=torch.float64) * 3
    acc = torch.rand(len(names), generator=g, dtype=torch.float64) if accuracy else None
    scores = Scores(names, loss, acc)
    scores.save(path)
    return scores


def test_bank_path_loads_only_the_top_m(lora_bank_dir, tmp_path):
    bank_dir = tmp_path / "bank"
    shutil.copytree(lora_bank_dir, bank_dir)
    full = LoraBank.load(bank_dir)
    scores = _scores_for(full.names, tmp_path / "s.json")
    in_memory = select_experts(scores, full, top_m=3, n_experts=2, device="cpu")
    outside = next(r["name"] for r in in_memory.table if r["top_m"] is None)
    (bank_dir / outside / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    lazy = select_experts(scores, bank_dir, top_m=3, n_experts=2, device="cpu")
    assert lazy.experts == in_memory.experts and lazy.paths == in_memory.paths
    assert torch.allclose(lazy.similarity, in_memory.similarity, equal_nan=True)


def test_cli_select_end_to_end(lora_bank_dir, tmp_path, capsys):
    bank = LoraBank.load(lora_bank_dir)
    _scores_for(bank.names, tmp_path / "scores.json", seed=4)
    out = tmp_path / "run" / "experts.txt"
    rc = cli_main(["select", "--scores", str(tmp_path / "scores.json"), "--bank", str(lora_bank_dir),
                   "--n-experts", "2", "--top-m", "3", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    header, *lines = out.read_text().splitlines()
    assert header.startswith("# experts chosen by rocket")
    assert lines == [str(lora_bank_dir / n) for n in report["experts"]]
    chosen = LoraBank.load(out)   # the manifest is a bank: one adapter directory per line
    assert chosen.names == report["experts"] and all(n in printed for n in chosen.names)
    expected = select_experts(Scores.load(tmp_path / "scores.json"), bank, top_m=3, n_experts=2, device="cpu")
    assert report["experts"] == expected.experts
    assert report["tuples_total"] == 3 and len(report["ranking"]) == len(bank)
    assert len(report["similarity"]) == 3 and report["uses_accuracy"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob("*.tmp"))


def test_selection_save_writes_the_manifest_rocket_select_writes(lora_bank_dir, tmp_path, monkeypatch):
    bank = LoraBank.load(lora_bank_dir)
    sel = select_experts(_scores_for(bank.names, tmp_path / "s.json", seed=2), bank, top_m=3, n_experts=2,
                         device="cpu")
    monkeypatch.chdir(lora_bank_dir)  # a bank given by a relative path still gives absolute lines
    relative = select_experts(Scores.load(tmp_path / "s.json"), Path("."), top_m=3, n_experts=2, device="cpu")
    assert relative.paths == sel.paths == [str(lora_bank_dir / n) for n in sel.experts]
    path = sel.save(tmp_path / "out" / "experts.txt")
    assert path.read_text() == "".join(f"{line}\n" for line in [
        f"# experts chosen by rocket {__import__('rocket').__version__} (select): one adapter directory per line",
        *sel.paths])
    assert LoraBank.load(path).names == sel.experts
    assert [p.name for p in path.parent.iterdir()] == ["experts.txt"]  # no temporary file left


def test_cli_select_errors_are_one_line_and_write_nothing(lora_bank_dir, tmp_path, capsys):
    _scores_for(["qv_r4", "nobody"], tmp_path / "scores.json")
    out = tmp_path / "experts.txt"
    rc = cli_main(["select", "--scores", str(tmp_path / "scores.json"), "--bank", str(lora_bank_dir),
                   "--n-experts", "1", "--top-m", "2", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "'nobody'" in err and "not in the bank" in err
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:group_similarity")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_similarity_matches_explicit(dtype):
    # half-precision products are exact in the float32 Gram output: float32-level agreement
    atol = 2e-6
    bank = random_bank(40, seed=9, dtype=dtype)
    ref = explicit_cos(bank)   # of the (rounded) stored weights, in float64
    assert_same_nan(group_similarity(bank, device="cuda", block_rows=64), ref, atol)
