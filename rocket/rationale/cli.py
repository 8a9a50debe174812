"""`rocket rationale`: add a generated rationale after the gold answer of every K-shot item."""
from __future__ import annotations

from rocket.modeling import add_tokenizer_argument
from rocket.rationale.generate import write_rationales


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory of the rationale model (a strong "
                        "instruct model)")
    add_tokenizer_argument(parser, "--model")
    parser.add_argument("--kshot", required=True, help="K-shot examples, gold answers in 'output' (JSONL or JSON array)")
    parser.add_argument("--out", required=True, help="JSONL to write: the items with output = answer, newline, "
                        "rationale (resumes from OUT.partial)")
    parser.add_argument("--template", default="auto", help="how the request is wrapped: auto (the tokenizer's chat "
                        "template if it has one, else plain), plain, chat, alpaca, llama2, mistral or a .json file "
                        "(default: auto)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="rationale length cap in tokens (default: 256)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    items = write_rationales(args.model, args.kshot, args.out, tokenizer=args.tokenizer, device=args.device,
                             dtype=args.dtype, template=args.template, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    print(f"wrote {len(items)} K-shot items with rationales to {args.out}")
    return 0
