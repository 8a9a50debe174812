"""Augmentation at scale (docs/design.md, 'Data selection'): one `select_data` call (rocket's Embedder,
retrieval and exact dedup) over 1e6 open items, against the pipeline a skilled user builds from
sentence-transformers and FAISS, on the same texts with the same encoder weights.

GPU: n = 1,000,000 synthetic pool texts of 50–400 tokens (one word = one token), K = 50 K-shot items,
C = 20,000 candidates (target 20,050), τ = 0.9; the encoder is a random-init BERT of the
all-MiniLM-L6-v2 shape (hidden 384, 6 layers, vocab 30,005; bench.cases.synthetic_encoder). Texts
come from 200 topics (the K-shot items from 5), 5% of the pool are copies of other pool texts (a third
exact, the rest with 3% of their words replaced) and half the K-shot items have a copy in the pool, so
both of dedup's rules have work. CPU: n = 360 with a tiny encoder, correctness only.

Rows: `rocket_select_data` (end to end, embedding included, default batch settings) and its parts from
the report's `timings_s`; `peer_st_faiss`: SentenceTransformer.encode (fp16 via model.half() on CUDA,
batch_size 256, normalize_embeddings, convert_to_numpy), a FAISS IndexFlatIP over the K-shot
embeddings searched by the pool (the top-1 inner product is the priority), the top C by priority
(stable: ties by lower index), then FAISS range_search among the C at τ, the lower-ranked item of each
pair dropped and candidates above τ to a K-shot item dropped (the rule of docs/design.md). FAISS
runs on the GPU when faiss.get_num_gpus() > 0 (range search through
faiss.contrib.exhaustive_search.range_search_gpu: GPU kNN, CPU range search for rows with more
neighbours), else on the CPU; the row records which. Both pipelines' models are loaded before
timing, and each pipeline first runs once on a small slice (warm-up). Each then runs once end to end
(ROCKET_BENCH_AUG_REPS: more runs, interleaved, medians). The row is recorded after every finished
run and the suite's JSON written at once, so a run stopped by a time limit (SIGINT) keeps what
finished, with the unfinished pipeline's seconds so far as a lower bound (`unfinished_after_s`). Peak GPU memory is the torch allocator's
(faiss-gpu's own allocations are not in it); embedding throughput counts non-padding tokens ([CLS]
and [SEP] included). Generation of the texts is timed apart and not counted.

Correctness: on the CPU (both fp32) the selected sets overlap ≥ 0.95 and rocket's selection equals
the rule evaluated in float64 on its own embeddings; on the GPU (both fp16, near-ties may flip) the
overlap is recorded (and must be ≥ 0.9). ROCKET_BENCH_AUG_N overrides n.
"""
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from bench.cases import synthetic_encoder, synthetic_texts, word_corpus
from bench.harness import timed
from rocket.augment.build import select_data
from rocket.augment.embed import Embedder
from rocket.data.examples import example_text
from rocket.kernels.reference import priority_order_less

GPU = dict(n=1_000_000, K=50, C=20_000, vocab=30_000, topics=200, topic_words=50, kshot_topics=5, dup_frac=0.05,
           hidden=384, layers=6, heads=12, intermediate=1536, warm=4096)
CPU = dict(n=360, K=12, C=100, vocab=2000, topics=6, topic_words=30, kshot_topics=2, dup_frac=0.1,
           hidden=64, layers=2, heads=4, intermediate=128, warm=48)
THRESHOLD = 0.9
N = os.environ.get("ROCKET_BENCH_AUG_N")
REPS = int(os.environ.get("ROCKET_BENCH_AUG_REPS", "1"))


def make_data(s, n):
    """(kshot items, pool items, tokens per text of K-shot + pool) of shape s with n pool items."""
    rng = np.random.default_rng(0)
    corpus = word_corpus(s["vocab"], s["topics"], s["topic_words"])
    K = s["K"]
    kshot_topics = rng.choice(s["topics"], s["kshot_topics"], replace=False)
    topic = np.concatenate([kshot_topics[np.arange(K) % len(kshot_topics)], rng.integers(0, s["topics"], n)])
    m = int(s["dup_frac"] * n)
    dst = K + rng.choice(n, m + K // 2, replace=False)
    src = np.concatenate([K + rng.integers(0, n, m), np.arange(K // 2)])  # pool copies, then copies of K-shot items
    exact = rng.random(len(dst)) < 1 / 3
    texts, n_words = synthetic_texts(topic, corpus, (src.tolist(), dst.tolist(), exact.tolist()), seed=1)
    items = [{"instruction": t} for t in texts]
    return items[:K], items[K:], corpus, n_words + 2


def peer_st_faiss(model, kshot, pool, c, threshold):
    """sentence-transformers + FAISS, the rule of docs/design.md: (output items, selected pool
    indices in output order, part timings in s, which FAISS ran)."""
    import faiss
    t, start = {}, time.perf_counter()

    def encode(items):
        emb = model.encode([example_text(e) for e in items], batch_size=256, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32)
    kshot_emb, pool_emb = encode(kshot), encode(pool)
    t["embed"] = time.perf_counter() - start

    mark = time.perf_counter()
    gpu = faiss.get_num_gpus() > 0
    res = faiss.StandardGpuResources() if gpu else None
    index = faiss.IndexFlatIP(kshot_emb.shape[1])
    index.add(kshot_emb)
    if gpu:
        index = faiss.index_cpu_to_gpu(res, 0, index)
    prio = index.search(pool_emb, 1)[0][:, 0]
    ranked = np.argsort(-prio, kind="stable")[:c]  # candidates in rank order: priority, then lower index
    t["retrieve"] = time.perf_counter() - mark

    mark = time.perf_counter()
    cand_emb = pool_emb[ranked]
    cand_index = faiss.IndexFlatIP(cand_emb.shape[1])
    cand_index.add(cand_emb)
    if gpu:
        from faiss.contrib.exhaustive_search import range_search_gpu
        lims, _, found = range_search_gpu(cand_emb, threshold, faiss.index_cpu_to_gpu(res, 0, cand_index), cand_index)
    else:
        lims, _, found = cand_index.range_search(cand_emb, threshold)  # pairs with inner product > τ
    query = np.repeat(np.arange(len(ranked)), np.diff(lims.astype(np.int64)))
    dropped = prio[ranked] > threshold  # copies of a K-shot item
    dropped[query[found < query]] = True  # a pair drops its lower-ranked item (later in rank order)
    selected = ranked[~dropped]
    out = [dict(e) for e in kshot] + [dict(pool[j]) for j in selected]
    t["dedup"] = time.perf_counter() - mark
    t["total"] = time.perf_counter() - start
    return out, selected, t, {"search": "faiss-gpu" if gpu else "faiss-cpu",
                              "range_search": "faiss-gpu range_search_gpu" if gpu else "faiss-cpu range_search"}


def reference_selection(embedder, kshot, pool, c, threshold):
    """The rule in float64 on the embedder's own rows, read literally: selected pool indices in output order."""
    k = embedder.encode([example_text(e) for e in kshot], progress=False).double()
    p = embedder.encode([example_text(e) for e in pool], progress=False).double()
    prio = (p @ k.T).amax(dim=1)
    cand = torch.from_numpy(np.argsort(-prio.numpy(), kind="stable")[:c].copy())
    pc, e = prio[cand], p[cand]
    outranks = priority_order_less(pc[None, :], cand[None, :], pc[:, None], cand[:, None])
    dropped = ((e @ e.T > threshold) & outranks).any(dim=1) | (pc > threshold)
    kept = cand[~dropped]
    return kept[np.argsort(-prio[kept].numpy(), kind="stable")].tolist()


def test_augment_scale(recorder, device, on_gpu):
    s = GPU if on_gpu else CPU
    n = int(float(N)) if N else s["n"]
    t0 = time.perf_counter()

    def say(msg):  # a device run that hits its limit still shows where it was
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    kshot, pool, corpus, tokens = make_data(s, n)
    generation_s = time.perf_counter() - t0
    K, c = len(kshot), min(s["C"], n // 3)
    target = K + c
    say(f"{K} K-shot + {n} pool texts generated in {generation_s:.1f} s ({int(tokens.sum()):,} tokens)")

    try:
        import faiss  # noqa: F401
        from sentence_transformers import SentenceTransformer
        peer_skipped = None
    except ImportError as e:
        peer_skipped = f"peer not run: {e}"
        say(peer_skipped)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = synthetic_encoder(tmp, corpus["words"], s["hidden"], s["layers"], s["heads"], s["intermediate"])
        embedder = Embedder(model_dir, device)
        assert embedder.backend == "hf" and embedder.pooling == "mean" and embedder.max_length == 512
        st = None
        if peer_skipped is None:
            st = SentenceTransformer(str(model_dir), device=str(device))
            if on_gpu:
                st.half()
    say(f"encoder ready: rocket {embedder.backend} {embedder.dtype}, peer "
        f"{'skipped' if st is None else next(st.parameters()).dtype}")

    def rocket(kshot_, pool_, target_):
        return select_data(kshot_, pool_, target_, THRESHOLD, embedder=embedder, device=device, progress=False)

    def peer(kshot_, pool_, target_):
        return peer_st_faiss(st, kshot_, pool_, target_ - len(kshot_), THRESHOLD)

    runs = {"rocket_select_data": rocket} | ({} if st is None else {"peer_st_faiss": peer})
    warm = min(s["warm"], n)
    for name, fn in runs.items():  # warm-up: CUDA context, cuBLAS, Triton compilation, FAISS resources
        fn(kshot, pool[:warm], K + warm // 3)
    say(f"warm-up on {warm} items done")

    seconds = {name: [] for name in runs}
    parts = {name: {"embed": [], "retrieve": [], "dedup": []} for name in runs}
    peak_gib, results, row = {}, {}, {}
    n_tokens = int(tokens.sum())

    def summary():
        """The suite's row from the runs finished so far (rocket's first)."""
        done = [name for name in runs if seconds[name]]
        med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        medians = {name: med(seconds[name]) for name in done}
        for name in done:
            prefix = "rocket" if name == "rocket_select_data" else "peer"
            medians |= {f"{prefix}_{part}": med(parts[name][part]) for part in parts[name]}
        report = results["rocket_select_data"][1]
        tokens_per_s = {"rocket": n_tokens / (medians["rocket_embed"] / 1e3)}
        extra = {}
        if "peer_st_faiss" in done:
            selected, peer_selected = report["selected"], results["peer_st_faiss"][1].tolist()
            tokens_per_s["peer"] = n_tokens / (medians["peer_embed"] / 1e3)
            extra = dict(rocket_over_peer={part: medians[f"rocket_{part}"] / medians[f"peer_{part}"]
                                           for part in ("embed", "retrieve", "dedup")}
                         | {"end_to_end": medians["rocket_select_data"] / medians["peer_st_faiss"]},
                         overlap=len(set(selected) & set(peer_selected)) / max(len(selected), len(peer_selected), 1),
                         peer_selected=len(peer_selected), peer_faiss=results["peer_st_faiss"][3],
                         peer_dtype=str(next(st.parameters()).dtype))
        return dict(
            shape={k: s[k] for k in ("K", "vocab", "topics", "hidden", "layers", "heads", "intermediate")}
            | {"n": n, "C": c, "target": target, "threshold": THRESHOLD, "tokens": n_tokens,
               "mean_tokens_per_text": n_tokens / (K + n), "rocket_dtype": str(embedder.dtype)},
            medians_ms=medians, baseline="peer_st_faiss" if "peer_st_faiss" in done else None, reps=REPS,
            peak_memory_gib=peak_gib, embed_tokens_per_s=tokens_per_s, generation_s=generation_s,
            rocket_selected=len(report["selected"]), counts=report["counts"], retrieval=report["retrieval"],
            dedup=report["dedup"], peer_skipped=peer_skipped, **extra)

    for rep in range(REPS):
        for name, fn in runs.items():
            start = time.perf_counter()
            try:
                sec, peak, res = timed(lambda: fn(kshot, pool, target), device)
            except KeyboardInterrupt:  # stopped by a time limit: the row keeps what finished, and a lower bound
                if row:
                    row.setdefault("unfinished_after_s", {})[name] = time.perf_counter() - start
                raise
            seconds[name].append(sec)
            peak_gib[name] = max(peak_gib.get(name) or 0.0, peak) if peak is not None else None
            results[name] = res
            if name == "rocket_select_data":
                t = res[1]["timings_s"]
                t = {"embed": t["embed_kshot"] + t["embed_pool"], "retrieve": t["retrieve"], "dedup": t["dedup"]}
            else:
                t = res[2]
            for part in parts[name]:
                parts[name][part].append(t[part])
            say(f"{name} run {rep + 1}: {sec:.2f} s (embed {t['embed']:.2f}, retrieve {t['retrieve']:.2f}, "
                f"dedup {t['dedup']:.2f}), peak {peak} GiB")
            latest = summary()  # recorded at once (replacing the last), so a run stopped later still writes it
            if row:
                recorder.rows.remove(row)
            row = recorder.record(device, latest.pop("shape"), latest.pop("medians_ms"), **latest)
            recorder.checkpoint()

    selected = results["rocket_select_data"][1]["selected"]
    tokens_per_s = row["embed_tokens_per_s"]
    if st is not None:
        say(f"rocket / peer end to end {row['rocket_over_peer']['end_to_end']:.3f}, overlap {row['overlap']:.4f} "
            f"({len(selected)} vs {row['peer_selected']} selected), FAISS {row['peer_faiss']['search']}")
    say(f"rocket embeds {tokens_per_s['rocket']:,.0f} tokens/s"
        + (f", peer {tokens_per_s['peer']:,.0f}" if "peer" in tokens_per_s else ""))

    # correctness, not speed
    counts = row["counts"]
    assert counts["duplicates_removed"] > 0 and counts["kshot_copies_removed"] > 0, counts
    if st is not None:
        assert row["overlap"] >= (0.9 if on_gpu else 0.95), row["overlap"]
    if not on_gpu:
        assert selected == reference_selection(embedder, kshot, pool, c, THRESHOLD)
