"""`rocket score`: score every adapter of a bank on K-shot data."""
from __future__ import annotations

from pathlib import Path

from rocket.adapters.bank import LoraBank
from rocket.data.answers import DEFAULT_MAX_NEW_TOKENS
from rocket.data.examples import load_examples
from rocket.modeling import add_tokenizer_argument, check_model_dir, check_tokenizer_dir, load_base, resolve_dtype
from rocket.scoring.accuracy import plan_accuracy
from rocket.scoring.heatmap import save_heatmap
from rocket.scoring.score import score_adapters, score_summary
from rocket.errors import ScoringError
from rocket.io import check_paths


def add_accuracy_arguments(group) -> None:
    """--accuracy / --no-accuracy / --accuracy-file and --max-new-tokens (rocket score, rocket run)."""
    acc = group.add_mutually_exclusive_group()
    acc.add_argument("--accuracy", nargs="?", const="auto", default="auto",
                     choices=["auto", "choice", "number", "exact"],
                     help="exact-match accuracy of greedy generations, read with this extractor (default: auto, "
                     "from the K-shot golds: option labels -> choice, stated numbers -> number, else exact)")
    acc.add_argument("--no-accuracy", dest="accuracy", action="store_const", const=None,
                     help="no accuracy: rank by reasoning perplexity and diversity only (the ablation)")
    acc.add_argument("--accuracy-file", help="JSON {adapter: accuracy} to use as accuracy instead of generating")
    group.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help=f"generation length for accuracy (default: {DEFAULT_MAX_NEW_TOKENS}, room for a "
                       "rationale before '#### X' / 'The answer is X')")


def add_arguments(parser) -> None:
    parser.add_argument("--base-model", required=True, help="HF model directory of the base model")
    add_tokenizer_argument(parser)
    parser.add_argument("--bank", required=True, help="directory of peft adapters, or a manifest .txt")
    parser.add_argument("--data", "--kshot", dest="data", required=True,
                        help="K-shot examples (JSONL or JSON array): their golds for accuracy, and their outputs "
                        "for perplexity unless --data-cot is given")
    parser.add_argument("--data-cot", "--kshot-cot", dest="data_cot",
                        help="the K-shot examples with rationales in 'output': reasoning perplexity is computed "
                        "on them (default: on --data, vanilla perplexity)")
    parser.add_argument("--out", required=True, help="scores JSON to write")
    add_accuracy_arguments(parser)
    parser.add_argument("--template", default="alpaca", help="prompt template: alpaca, llama2, mistral, chat "
                        "or a .json file (default: alpaca)")
    parser.add_argument("--heatmap", help="also write a loss heatmap PNG here")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per forward pass, rows packed without padding (default: 32768 on CUDA, "
                        "4096 on CPU)")
    parser.add_argument("--strategy", choices=["auto", "merged", "sgmv"], default="auto",
                        help="sgmv: many adapters per pass (multi-adapter LoRA kernel); merged: one adapter "
                        "merged into the weights at a time; auto: merged on a GPU when each adapter has "
                        ">= 2048 tokens to score (default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile transformers' decoder layers for the loss passes instead of rocket's "
                        "Llama fast path (for other architectures, on large banks)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    check_paths({"--data": args.data, "--data-cot": args.data_cot, "--accuracy-file": args.accuracy_file,
                 "--bank": args.bank if Path(args.bank).is_file() else None},
                {"--out": args.out, "--heatmap": args.heatmap}, ScoringError)
    examples = load_examples(args.data)
    cot = load_examples(args.data_cot) if args.data_cot else None
    plan_accuracy(examples, args.accuracy, args.accuracy_file)  # every gold readable, before any long work
    check_model_dir(args.base_model)
    check_tokenizer_dir(args.base_model, args.tokenizer)
    bank = LoraBank.load(args.bank, progress=not args.no_progress)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = load_base(args.base_model, args.device, dtype, args.tokenizer)
    scores = score_adapters(model, tokenizer, bank, examples, args.template, accuracy=args.accuracy,
                            accuracy_file=args.accuracy_file, perplexity_examples=cot,
                            max_new_tokens=args.max_new_tokens, max_tokens=args.max_tokens,
                            progress=not args.no_progress, strategy=args.strategy, compile=args.compile)
    scores.meta.update(base_model=str(args.base_model), tokenizer=args.tokenizer and str(args.tokenizer),
                       bank=str(args.bank), data=str(args.data), data_cot=args.data_cot and str(args.data_cot),
                       dtype=str(dtype))
    scores.save(args.out)
    if args.heatmap:
        save_heatmap(scores, args.heatmap)
    print(f"scored {len(bank)} adapters on {scores.loss.shape[1]} examples in {scores.meta['seconds']:.1f}s; "
          f"{score_summary(scores)}; wrote {args.out}")
    return 0
