"""`rocket run`: the whole pipeline in one run directory."""
from __future__ import annotations

from pathlib import Path
from rocket.modeling import add_tokenizer_argument
from rocket.pipeline.run import RunConfig, STAGES, run_pipeline
from rocket.scoring.cli import add_accuracy_arguments


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--base-model", required=True, help="HF model directory of the base model")
    add_tokenizer_argument(parser)
    parser.add_argument("--bank", required=True, help="directory of peft adapters, or a manifest .txt")
    parser.add_argument("--kshot", required=True, help="K-shot examples of the task (JSONL or JSON array): golds "
                        "for accuracy, data for retrieval and training, and for perplexity unless --kshot-cot")
    parser.add_argument("--kshot-cot", help="the K-shot examples with rationales in 'output': reasoning perplexity "
                        "is scored on them (default: on --kshot, vanilla perplexity)")
    parser.add_argument("--pool", "--opensource", dest="pool", required=True,
                        help="the open pool: instruction data to select from (--opensource: the reference's name)")
    parser.add_argument("--out", required=True, help="run directory (created; an existing one is resumed)")
    g = parser.add_argument_group("score")
    g.add_argument("--template", default="alpaca", help="prompt template: alpaca, llama2, mistral, chat "
                   "or a .json file (default: alpaca)")
    add_accuracy_arguments(g)
    g.add_argument("--max-tokens", type=int, default=None, help="padded tokens per scoring forward")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype for scoring (auto: bfloat16 on CUDA, float32 on CPU)")
    g = parser.add_argument_group("select")
    g.add_argument("--n-experts", type=int, default=4, help="experts to choose (default: 4)")
    g.add_argument("--top-m", type=int, default=8, help="prefilter size M by R_P + R_A (default: 8)")
    g = parser.add_argument_group("augment")
    g.add_argument("--target", type=int, default=1000, help="augmented size before dedup (default: 1000)")
    g.add_argument("--threshold", type=float, default=0.9, help="near-duplicate cosine (default: 0.9)")
    g.add_argument("--embed-model", help="local encoder directory (default: bundled all-MiniLM-L6-v2)")
    g.add_argument("--prefix", help="text prepended to every item before embedding")
    g = parser.add_argument_group("train")
    g.add_argument("--epochs", type=int, help="training epochs (default: rocket train's)")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, help="learning rate (default: rocket train's)")
    g.add_argument("--batch-size", type=int, help="micro-batch per device (default: rocket train's)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: rocket train's)")
    g.add_argument("--top-k", type=int, help="experts per token (default: 2)")
    g.add_argument("--cutoff", type=int, help="max tokens per example (default: rocket train's)")
    g.add_argument("--save-steps", type=int, help="checkpoint every N optimizer steps, so a killed run loses "
                   "at most N steps (default: rocket train's, at the end of each epoch)")
    g.add_argument("--train-router-only", action="store_true", help="freeze the experts, train the routers")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each micro-batch shape from a CUDA graph (plain torch loop on one GPU)")
    g.add_argument("--deepspeed", help="DeepSpeed config: a JSON file, or zero2 / zero3 (shipped)")
    g.add_argument("--backend", choices=["auto", "deepspeed", "torch"],
                   help="training loop: auto (DeepSpeed when usable, else plain torch; the default)")
    g = parser.add_argument_group("report")
    g.add_argument("--eval-data", help="held-out examples: the report compares the trained MoE with the base "
                   "model and each expert on them (loss and accuracy, as rocket eval; eval.json)")
    g = parser.add_argument_group("run")
    g.add_argument("--force", choices=STAGES, help="redo this stage and every later one")
    g.add_argument("--stop-after", choices=STAGES, help="stop after this stage")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


TRAIN_FLAGS = ("epochs", "lr", "batch_size", "grad_accum", "top_k", "cutoff", "save_steps", "deepspeed", "backend")


def config_from_args(args) -> RunConfig:
    train = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    for flag in ("train_router_only", "cuda_graphs"):
        if getattr(args, flag):
            train[flag] = True
    return RunConfig(base_model=args.base_model, bank=args.bank, kshot=args.kshot, pool=args.pool,
                     out=args.out, tokenizer=args.tokenizer, template=args.template, kshot_cot=args.kshot_cot,
                     accuracy=args.accuracy, accuracy_file=args.accuracy_file,
                     max_new_tokens=args.max_new_tokens, max_tokens=args.max_tokens, dtype=args.dtype,
                     n_experts=args.n_experts, top_m=args.top_m, target=args.target, threshold=args.threshold,
                     embed_model=args.embed_model, prefix=args.prefix, train=train, eval_data=args.eval_data,
                     device=str(args.device),
                     seed=args.seed, progress=not args.no_progress)


def main(args) -> int:
    cfg = config_from_args(args)
    status = run_pipeline(cfg, args.force, args.stop_after)
    ran = [s for s, v in status.items() if v == "ran"]
    print(f"rocket run: {cfg.out}: ran {', '.join(ran) or 'nothing'}"
          + (f"; skipped {', '.join(s for s, v in status.items() if v == 'skipped')}" if len(ran) < len(status) else "")
          + (f"; report: {Path(cfg.out) / 'report.html'}" if "report" in status else ""))
    return 0
