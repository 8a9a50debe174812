"""rocket.select_data and `rocket augment` against the rule of DESIGN §3 read literally."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rocket import select_data
from rocket.errors import AugmentError
from rocket.augment.retrieval import retrieve
from rocket.cli import main as cli_main
from rocket.data.examples import load_examples
from rocket.augment.embed import load_embedder
from tests.conftest import DATA


def brute_force(kshot_emb, pool_emb, target, threshold):
    """Selected pool indices in output order, from float64 pairwise loops over the rule."""
    k, p = np.asarray(kshot_emb, np.float64), np.asarray(pool_emb, np.float64)
    prio = [max(float(k[i] @ p[j]) for i in range(len(k))) for j in range(len(p))]
    ranked = sorted(range(len(p)), key=lambda j: (-prio[j], j))
    cand = ranked[:target - len(k)]
    # the K-shot items outrank every pool item: a candidate within τ of one (prio > τ) is dropped
    kept = [j for j in cand
            if prio[j] <= threshold and not any(float(p[j] @ p[m]) > threshold for m in cand
                                                if m != j and (prio[m] > prio[j] or (prio[m] == prio[j] and m < j)))]
    return sorted(kept, key=lambda j: (-prio[j], j)), prio, cand


def examples(n, tag):
    return [{"instruction": f"{tag} {i}", "input": "", "output": str(i)} for i in range(n)]


def dyadic_units(n, d, gen):
    """Unit vectors with four entries ±1/2: every dot product is an exact multiple of 1/4, so
    priorities and similarities tie exactly and often (the tie-breaks are what is tested)."""
    emb = torch.zeros(n, d)
    for row in emb:
        pos = torch.randperm(d, generator=gen)[:4]
        row[pos] = (torch.randint(0, 2, (4,), generator=gen).float() - 0.5)
    return emb


def gaussian_with_near_duplicates(n, d, gen, frac=0.3, noise=0.15):
    """Random unit rows; a fraction are noisy copies of others, and a few exact copies (prio ties)."""
    emb = torch.randn(n, d, generator=gen)
    src = torch.randint(0, n, (int(n * frac),), generator=gen)
    dst = torch.randint(0, n, (int(n * frac),), generator=gen)
    emb[dst] = emb[src] + noise * torch.randn(len(dst), d, generator=gen)
    emb = F.normalize(emb, dim=1)
    emb[dst[::5]] = emb[src[::5]]
    return emb


def run(kshot_emb, pool_emb, target, threshold, **kw):
    kshot, pool = examples(len(kshot_emb), "kshot"), examples(len(pool_emb), "pool")
    out, report = select_data(kshot, pool, target, threshold, kshot_embeddings=kshot_emb,
                              pool_embeddings=pool_emb, device="cpu", progress=False, **kw)
    assert out[:len(kshot)] == kshot
    assert [int(e["output"]) for e in out[len(kshot):]] == report["selected"]
    return report


@pytest.mark.parametrize("n_k, n, d, target, threshold", [
    (5, 400, 16, 205, 0.6), (1, 37, 16, 38, 0.3), (7, 90, 12, 500, 0.6), (3, 300, 8, 60, -0.1)])
def test_exact_ties_match_brute_force(n_k, n, d, target, threshold):
    gen = torch.Generator().manual_seed(n + d)
    kshot_emb, pool_emb = dyadic_units(n_k, d, gen), dyadic_units(n, d, gen)
    want, prio, cand = brute_force(kshot_emb, pool_emb, target, threshold)
    assert len(set(prio)) < n // 2  # heavy ties, or the test would not exercise tie-breaks
    report = run(kshot_emb, pool_emb, target, threshold)
    assert report["selected"] == want and report["dedup"]["method"] == "exact"
    c = report["counts"]
    near = sum(prio[j] > threshold for j in cand)
    assert (c["candidates"], c["kept"], c["kshot_copies_removed"]) == (len(cand), len(want), near)
    assert c["duplicates_removed"] + c["kshot_copies_removed"] == len(cand) - len(want)
    assert c["output"] == n_k + len(want) and c["kshot_included"] == n_k and c["pool"] == n


@pytest.mark.parametrize("seed, n_k, n, d, target", [(0, 10, 1000, 32, 510), (1, 3, 257, 7, 103)])
def test_near_duplicates_match_brute_force(seed, n_k, n, d, target):
    gen = torch.Generator().manual_seed(seed)
    kshot_emb = F.normalize(torch.randn(n_k, d, generator=gen), dim=1)
    pool_emb = gaussian_with_near_duplicates(n, d, gen)
    want, prio, cand = brute_force(kshot_emb, pool_emb, target, 0.9)
    assert len(set(prio)) < n  # exact copies tie
    report = run(kshot_emb, pool_emb, target, 0.9)
    assert report["selected"] == want
    assert 0 < report["counts"]["duplicates_removed"] < len(cand)


def test_kshot_copies_in_the_pool_are_dropped_and_counted():
    """Pool items that copy a K-shot item (exactly, or within τ) never join the K-shot items they copy."""
    gen = torch.Generator().manual_seed(11)
    kshot_emb = F.normalize(torch.randn(4, 24, generator=gen), dim=1)
    other = F.normalize(torch.randn(40, 24, generator=gen), dim=1)
    near = F.normalize(kshot_emb[2] + 0.05 * torch.randn(24, generator=gen), dim=0)
    pool_emb = torch.cat([other[:10], kshot_emb[:2], near[None], other[10:]])    # rows 10, 11 exact, 12 near
    assert float(near @ kshot_emb[2]) > 0.9
    report = run(kshot_emb, pool_emb, 4 + 20, 0.9)
    want, _, _ = brute_force(kshot_emb, pool_emb, 4 + 20, 0.9)
    assert report["selected"] == want and not {10, 11, 12} & set(report["selected"])
    assert report["counts"]["kshot_copies_removed"] == 3


def test_ivf_probing_every_list_is_exact():
    gen = torch.Generator().manual_seed(3)
    kshot_emb = F.normalize(torch.randn(4, 16, generator=gen), dim=1)
    pool_emb = gaussian_with_near_duplicates(2000, 16, gen)
    flat = retrieve(kshot_emb, pool_emb, 300)
    ivf = retrieve(kshot_emb, pool_emb, 300, index="ivf", nlist=16, nprobe=16)
    assert np.array_equal(flat[0], ivf[0]) and np.allclose(flat[1], ivf[1])
    assert ivf[2]["index"] == "ivf" and (ivf[2]["nlist"], ivf[2]["nprobe"]) == (16, 16)
    approx = run(kshot_emb, pool_emb, 304, 0.9, index="ivf", nlist=16, nprobe=2, dedup_method="knn")
    assert approx["retrieval"]["nprobe"] == 2 and approx["counts"]["candidates"] == 300
    assert approx["dedup"]["method"] == "knn" and approx["counts"]["duplicates_removed"] > 0


def test_top_c_is_decided_in_float64():
    """Priorities closer than float32 resolution: FAISS's float32 scores tie or misorder them; the
    candidates and their priorities must still be those of the float64 rule."""
    gen = torch.Generator().manual_seed(0)
    kshot_emb = F.normalize(torch.randn(2, 64, generator=gen), dim=1)
    pool_emb = F.normalize(kshot_emb[0] + 3e-4 * torch.randn(400, 64, generator=gen), dim=1)
    prio64 = (pool_emb.double() @ kshot_emb.double().T).amax(1).numpy()
    prio32 = (pool_emb @ kshot_emb.T).amax(1).numpy()
    want = sorted(range(400), key=lambda j: (-prio64[j], j))[:150]
    assert set(want) != set(sorted(range(400), key=lambda j: (-prio32[j], j))[:150])  # float32 would differ
    top, prio, info = retrieve(kshot_emb, pool_emb, 150)
    assert top.tolist() == sorted(want) and np.array_equal(prio, prio64[top]) and info["rescored_float64"] >= 150


def test_precomputed_embeddings_are_normalised_and_checked():
    gen = torch.Generator().manual_seed(5)
    kshot_emb, pool_emb = torch.randn(3, 8, generator=gen), torch.randn(50, 8, generator=gen)
    scaled = run(kshot_emb * 3.0, pool_emb * 0.2, 23, 0.5)
    assert scaled["selected"] == brute_force(F.normalize(kshot_emb, dim=1), F.normalize(pool_emb, dim=1), 23, 0.5)[0]
    only_kshot = run(kshot_emb, pool_emb, np.int64(3), 0.5)  # target = K: no open item, nothing to dedup
    assert only_kshot["selected"] == [] and only_kshot["counts"]["output"] == 3 and only_kshot["priority"] is None
    kshot, pool = examples(3, "k"), examples(50, "p")
    for kw, msg in [(dict(pool_embeddings=pool_emb[:, :5]), r"pool_embeddings has shape \(50, 5\), expected \[50, 8\]"),
                    (dict(pool_embeddings=pool_emb[:49]), r"pool_embeddings has shape \(49, 8\)"),
                    (dict(pool_embeddings=torch.cat([pool_emb[:49], torch.zeros(1, 8)])), "row 49 is zero"),
                    (dict(pool_embeddings=pool_emb, target=2), "target 2 is smaller than the 3 K-shot"),
                    (dict(pool_embeddings=pool_emb, threshold=1.5), r"threshold must be a cosine in \[-1, 1\]"),
                    (dict(pool_embeddings=pool_emb, index="hnsw"), "unknown index 'hnsw'")]:
        kw = {"target": 10, "threshold": 0.9, **kw}
        with pytest.raises(AugmentError, match=msg):
            select_data(kshot, pool, kshot_embeddings=kshot_emb, device="cpu", progress=False, **kw)


# --------------------------------------------------------------------------- real text and the CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """K-shot = the ARC-C 10-shot set; pool = other science questions, exact and near copies of some,
    and unrelated chit-chat."""
    root = tmp_path_factory.mktemp("augment")
    science = [("Which of these is a renewable energy source?", "A. coal B. wind C. oil D. natural gas", "B. wind"),
               ("What causes the seasons on Earth?", "A. the tilt of Earth's axis B. distance to the Sun", "A"),
               ("Which organ pumps blood through the human body?", "A. lungs B. heart C. liver", "B. heart"),
               ("A student heats ice. Which change of state happens first?", "A. melting B. boiling", "A. melting"),
               ("Which tool measures the mass of a rock?", "A. ruler B. balance C. thermometer", "B. balance")]
    pool = [{"instruction": f"Question: {q} {o}\nAnswer:", "input": "", "output": a} for q, o, a in science]
    pool += [dict(pool[0]), dict(pool[2], instruction=pool[2]["instruction"].replace("human body", "body of a human"))]
    pool += [{"instruction": f"Write a friendly reply to message number {i} about weekend plans.", "input": "",
              "output": "Sounds great, see you Saturday!"} for i in range(6)]
    (root / "pool.jsonl").write_text("".join(json.dumps(e) + "\n" for e in pool))
    return root, DATA / "arc-c_10shot.jsonl", root / "pool.jsonl"


def test_cli_end_to_end_with_seed_aliases(files, capsys):
    root, kshot_path, pool_path = files
    out, rep = root / "aug.jsonl", root / "report.json"
    argv = ["augment", "--opensource_path", str(pool_path), "--kshot_data_path", str(kshot_path),
            "--target_num", "17", "--threshold", "0.9", "--out", str(out), "--report", str(rep),
            "--device", "cpu", "--no-progress"]
    assert cli_main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    report, written = json.loads(rep.read_text()), load_examples(out)
    kshot, pool = load_examples(kshot_path), load_examples(pool_path)
    c = report["counts"]
    assert (c["kshot"], c["pool"], c["candidates"], c["output"]) == (10, 13, 7, len(written))
    assert written[:10] == kshot and written[10:] == [pool[j] for j in report["selected"]]
    # The science questions outrank chit-chat; the exact copy (5) loses the tie to its original (0),
    # and of question 2 and its paraphrase (6) only the higher-priority one stays.
    chosen = set(report["selected"])
    assert chosen - {2, 6} == {0, 1, 3, 4} and len(chosen & {2, 6}) == 1 and c["duplicates_removed"] == 2
    assert set(report["timings_s"]) >= {"read", "load_embedder", "embed_kshot", "embed_pool", "retrieve",
                                        "dedup", "write", "total"}
    # The API on the same files gives the same selection.
    api, api_report = select_data(kshot, pool, 17, 0.9, embedder=load_embedder(None, "cpu"), device="cpu",
                                  progress=False)
    assert api == written and api_report["selected"] == report["selected"]


def test_cli_seed_prefix_and_embed_model(files):
    root, kshot_path, pool_path = files
    from rocket.augment.embed import default_model_dir
    out, rep = root / "aug_prefix.jsonl", root / "report_prefix.json"
    assert cli_main(["augment", "--pool", str(pool_path), "--kshot", str(kshot_path), "--target", "12",
                     "--out", str(out), "--report", str(rep), "--retrieval-prefix", "--device", "cpu",
                     "--embed-model", str(default_model_dir()), "--no-progress"]) == 0
    report = json.loads(rep.read_text())
    assert report["prefix"].startswith("Represent the following sentence") and report["counts"]["candidates"] == 2
    assert report["embedder"] == str(default_model_dir()) and len(load_examples(out)) == report["counts"]["output"]


@pytest.mark.parametrize("bad_line, msg", [('{"instruction": "q", "output": "a"', "malformed JSON"),
                                           ('{"instruction": "q"}', "missing field.*output"),
                                           ('["q", "a"]', "expected a JSON object")])
def test_malformed_pool_line_is_reported_and_nothing_written(tmp_path, capsys, bad_line, msg):
    pool = tmp_path / "pool.jsonl"
    good = json.dumps({"instruction": "q", "input": "", "output": "a"})
    pool.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n")
    out, rep = tmp_path / "aug.jsonl", tmp_path / "report.json"
    code = cli_main(["augment", "--pool", str(pool), "--kshot", str(DATA / "arc-c_10shot.jsonl"),
                     "--out", str(out), "--report", str(rep), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"{pool}:3: " in err and len(err.strip().splitlines()) == 1
    assert re.search(msg, err)
    assert not out.exists() and not rep.exists() and list(tmp_path.iterdir()) == [pool]


@pytest.mark.gpu
@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_cuda_matches_brute_force(index):
    if index == "ivf":
        pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(11)
    kshot_emb = F.normalize(torch.randn(9, 48, generator=gen), dim=1)
    pool_emb = gaussian_with_near_duplicates(3000, 48, gen)
    want = brute_force(kshot_emb, pool_emb, 1209, 0.9)[0]
    kshot, pool = examples(9, "kshot"), examples(3000, "pool")
    out, report = select_data(kshot, pool, 1209, 0.9, kshot_embeddings=kshot_emb, pool_embeddings=pool_emb,
                              device="cuda", index=index, nlist=8, nprobe=8, progress=False)
    assert report["selected"] == want and report["device"].startswith("cuda")
    assert [int(e["output"]) for e in out[9:]] == want
