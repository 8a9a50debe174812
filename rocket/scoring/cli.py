"""`rocket score`: score every adapter of a bank on K-shot data."""
from __future__ import annotations

import torch
from rocket.adapters.bank import LoraBank
from rocket.data.examples import load_examples
from rocket.modeling import load_base, resolve_dtype
from rocket.scoring.heatmap import save_heatmap
from rocket.scoring.score import score_adapters


def add_arguments(parser) -> None:
    parser.add_argument("--base-model", required=True, help="HF model directory of the base model")
    parser.add_argument("--bank", required=True, help="directory of peft adapters, or a manifest .txt")
    parser.add_argument("--data", required=True, help="K-shot examples (JSONL or JSON array)")
    parser.add_argument("--out", required=True, help="scores JSON to write")
    acc = parser.add_mutually_exclusive_group()
    acc.add_argument("--accuracy", nargs="?", const="exact", choices=["choice", "number", "exact"],
                     help="also compute exact-match accuracy of greedy generations with this extractor "
                          "(default when given without a value: exact)")
    acc.add_argument("--accuracy-file", help="JSON {adapter: accuracy} to use as accuracy")
    parser.add_argument("--template", default="alpaca", help="prompt template: alpaca, llama2, mistral, chat "
                        "or a .json file (default: alpaca)")
    parser.add_argument("--heatmap", help="also write a loss heatmap PNG here")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per forward pass, rows packed without padding (default: 32768 on CUDA, "
                        "4096 on CPU)")
    parser.add_argument("--strategy", choices=["auto", "merged", "sgmv"], default="auto",
                        help="sgmv: many adapters per pass (multi-adapter LoRA kernel); merged: one adapter "
                        "merged into the weights at a time; auto: merged on a GPU when each adapter has "
                        ">= 4096 tokens to score (default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile transformers' decoder layers for the loss passes instead of rocket's "
                        "Llama fast path (for other architectures, on large banks)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length for --accuracy")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:

    examples = load_examples(args.data)
    bank = LoraBank.load(args.bank, progress=not args.no_progress)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = load_base(args.base_model, args.device, dtype)
    scores = score_adapters(model, tokenizer, bank, examples, args.template, accuracy=args.accuracy,
                            accuracy_file=args.accuracy_file, max_new_tokens=args.max_new_tokens,
                            max_tokens=args.max_tokens, progress=not args.no_progress, strategy=args.strategy,
                            compile=args.compile)
    scores.meta.update(base_model=str(args.base_model), bank=str(args.bank), data=str(args.data), dtype=str(dtype))
    scores.save(args.out)
    if args.heatmap:
        save_heatmap(scores, args.heatmap)
    best = int(torch.argmin(scores.ppl_sum))
    print(f"scored {len(bank)} adapters on {scores.loss.shape[1]} examples in {scores.meta['seconds']:.1f}s; "
          f"lowest PPL_R: {scores.names[best]} ({float(scores.ppl_sum[best]):.3f}); wrote {args.out}")
    return 0
