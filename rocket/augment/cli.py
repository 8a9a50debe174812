"""`rocket augment`: open data nearest the K-shot set, near-duplicates removed."""
from __future__ import annotations

import sys
import time
from rocket.data.examples import load_examples, write_jsonl
from rocket.augment.embed import REFERENCE_PREFIX, load_embedder
from rocket.augment.build import select_data
from rocket.augment.retrieval import INDEXES
from rocket.errors import AugmentError
from rocket.io import check_paths, write_json


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--pool", "--opensource", "--opensource_path", dest="pool", required=True,
                        help="the open pool: instruction data to select from (JSONL or JSON array; "
                        "--opensource and --opensource_path are the reference implementation's names)")
    parser.add_argument("--kshot", "--kshot_data_path", dest="kshot", required=True,
                        help="K-shot examples of the task (JSONL or JSON array)")
    parser.add_argument("--target", "--target_num", dest="target", type=int, default=1000,
                        help="output size before dedup, K-shot items included: the top C = target - K pool "
                        "items by similarity to the K-shot set are kept, then de-duplicated (default: 1000)")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="cosine above which a lower-priority item is a near-duplicate (default: 0.9)")
    parser.add_argument("--out", required=True, help="augmented data to write (JSONL)")
    parser.add_argument("--report", help="also write the selection report here (JSON)")
    parser.add_argument("--embed-model", help="local HF encoder or sentence-transformers directory "
                        "(default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--pooling", choices=["mean", "cls", "lasttoken"],
                        help="pooling of a plain HF encoder (default: mean, or the sentence-transformers config)")
    parser.add_argument("--max-length", "--cutoff_len", dest="max_length", type=int,
                        help="tokens per text, longer texts are truncated (default: the model's limit)")
    parser.add_argument("--batch-size", type=int, help="texts per embedding batch (default: 256 on CUDA, 32 on CPU)")
    prefix = parser.add_mutually_exclusive_group()
    prefix.add_argument("--prefix", help="text prepended to every item before embedding")
    prefix.add_argument("--retrieval-prefix", action="store_true",
                        help=f"prepend the reference implementation's retrieval instruction {REFERENCE_PREFIX!r}")
    parser.add_argument("--index", choices=INDEXES, default="flat",
                        help="FAISS search: flat (exact, default, fastest for one selection) or ivf "
                             "(approximate IVF index over the pool)")
    parser.add_argument("--nlist", type=int, help="IVF lists (default: sqrt(pool size))")
    parser.add_argument("--nprobe", type=int, help="IVF lists searched per query (default: min(64, nlist/4))")
    parser.add_argument("--dedup-method", choices=["auto", "exact", "knn", "ivf"], default="auto",
                        help="near-duplicate search (rocket.dedup): auto (exact unless the candidates are very "
                             "many), exact, knn or ivf (approximate)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    check_paths({"--kshot": args.kshot, "--pool": args.pool}, {"--out": args.out, "--report": args.report},
                AugmentError)
    start = time.perf_counter()
    kshot = load_examples(args.kshot)
    pool = load_examples(args.pool)
    read_s = time.perf_counter() - start
    t = time.perf_counter()
    embedder = load_embedder(args.embed_model, str(args.device), args.pooling, args.max_length)
    load_s = time.perf_counter() - t
    examples, report = select_data(
        kshot, pool, args.target, args.threshold, embedder=embedder,
        prefix=REFERENCE_PREFIX if args.retrieval_prefix else args.prefix, batch_size=args.batch_size,
        device=args.device, index=args.index, nlist=args.nlist, nprobe=args.nprobe,
        dedup_method=args.dedup_method, seed=args.seed,
        progress=not args.no_progress)
    t = time.perf_counter()
    write_jsonl(args.out, examples)
    report["timings_s"].update(read=round(read_s, 4), load_embedder=round(load_s, 4),
                               write=round(time.perf_counter() - t, 4),
                               total=round(time.perf_counter() - start, 4))
    report.update(pool_path=str(args.pool), kshot_path=str(args.kshot), out=str(args.out))
    if args.report:
        write_json(args.report, report)
    c = report["counts"]
    print(f"rocket augment: {c['pool']} pool items → {c['candidates']} candidates → {c['kept']} kept "
          f"({c['kshot_copies_removed']} copies of K-shot items and {c['duplicates_removed']} near-duplicates "
          f"above {args.threshold} removed) + {c['kshot']} K-shot = "
          f"{c['output']} items in {report['timings_s']['total']:.1f}s; wrote {args.out}", file=sys.stdout)
    return 0
