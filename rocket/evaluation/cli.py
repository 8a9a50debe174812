"""`rocket eval`: the trained LoRA-MoE against the base model and each expert on held-out data."""
from __future__ import annotations

from pathlib import Path

from rocket.data.answers import DEFAULT_MAX_NEW_TOKENS
from rocket.errors import EvaluationError
from rocket.evaluation.compare import evaluate_files
from rocket.io import check_paths
from rocket.modeling import add_tokenizer_argument
from rocket.moe.state import MOE_FILE


def add_arguments(parser) -> None:
    parser.add_argument("--base-model", required=True, help="HF model directory of the base model")
    add_tokenizer_argument(parser)
    parser.add_argument("--moe", required=True, help="what `rocket train --out` wrote (or a checkpoint directory, "
                        f"or its {MOE_FILE})")
    parser.add_argument("--bank", required=True, help="the experts: a manifest .txt (experts.txt) or a directory of "
                        "peft adapters; each is a row on its own")
    parser.add_argument("--data", required=True, help="held-out examples (JSONL or JSON array) with gold outputs")
    parser.add_argument("--template", default="alpaca", help="prompt template, the one the MoE was trained with: "
                        "alpaca, llama2, mistral, chat or a .json file (default: alpaca)")
    acc = parser.add_mutually_exclusive_group()
    acc.add_argument("--accuracy", default="auto", choices=["auto", "choice", "number", "exact"],
                     help="exact-match accuracy of greedy generations, read with this extractor (default: auto, "
                     "from the golds: option labels -> choice, stated numbers -> number, else exact)")
    acc.add_argument("--no-accuracy", dest="accuracy", action="store_const", const=None, help="loss only")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"generation length for accuracy (default: {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per forward pass (default: 32768 on CUDA, 4096 on CPU)")
    parser.add_argument("--out", help="also write the table here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    moe = Path(args.moe)
    check_paths({"--data": args.data, "--bank": args.bank if Path(args.bank).is_file() else None,
                 "--moe": moe / MOE_FILE if moe.is_dir() else moe}, {"--out": args.out}, EvaluationError)
    table = evaluate_files(args.base_model, args.moe, args.bank, args.data, device=args.device,
                           template=args.template, accuracy=args.accuracy, max_new_tokens=args.max_new_tokens,
                           max_tokens=args.max_tokens, progress=not args.no_progress, tokenizer=args.tokenizer)
    print(table.format())
    if args.out:
        table.save(args.out)
        print(f"wrote {args.out}")
    return 0
