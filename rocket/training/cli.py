"""`rocket train`: train the LoRA mixture of experts."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from rocket.modeling import add_tokenizer_argument
from rocket.training.config import TrainConfig
from rocket.training.loop import train


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--base-model", "--base_model", required=True, help="HF model directory of the base model")
    add_tokenizer_argument(parser)
    a("--data", "--data_path", required=True, help="training examples (JSONL or JSON array), e.g. aug.jsonl")
    a("--experts", required=True,
      help="the selected adapters: a manifest .txt (rocket select's experts.txt: one adapter directory, or the "
           "reference implementation's adapter_model.bin, per line) or a directory of adapters")
    a("--out", "--output_dir", required=True,
      help="output directory: the trained MoE (moe.safetensors, rocket_moe_config.json, the tokenizer), "
           "train_config.json, losses.json, checkpoints/; loads with rocket.load_moe(base_model, OUT)")
    a("--deepspeed", default=None,
      help="DeepSpeed config: a JSON file, or zero2 / zero3 (shipped; zero3 when several processes run)")
    a("--backend", choices=["auto", "deepspeed", "torch"], default="auto",
      help="auto (default): DeepSpeed for several processes or with --deepspeed (when installed and it "
           "starts), else the plain torch loop, the faster one on a single device")
    a("--train-router-only", "--train_router_only", action="store_true", help="freeze the experts, train routers")
    a("--top-k", "--top_k", type=int, default=d.top_k, help=f"experts per token (default {d.top_k})")
    a("--epochs", "--num_epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    a("--lr", "--learning_rate", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    a("--cutoff", "--cutoff_len", type=int, default=d.cutoff, help=f"max tokens per example (default {d.cutoff})")
    a("--batch-size", "--micro_batch_size", type=int, default=d.batch_size,
      help=f"micro-batch per device (default {d.batch_size})")
    a("--grad-accum", "--gradient_accumulation_steps", type=int, default=d.grad_accum,
      help=f"micro-batches per optimizer step (default {d.grad_accum})")
    a("--template", "--prompt_template_name", default=d.template,
      help="prompt template: alpaca, llama2, mistral, llama2_maths, chat or a .json file (default alpaca)")
    a("--overflow", choices=["drop", "truncate", "error"], default=d.overflow,
      help="examples longer than --cutoff (default drop)")
    a("--no-group-by-length", dest="group_by_length", action="store_false", help="plain shuffled batches")
    a("--pad-to-multiple", type=int, default=d.pad_to_multiple,
      help=f"pad batch lengths to a multiple of this (default {d.pad_to_multiple})")
    a("--group_by_length", dest="group_by_length", action="store_true", help=argparse.SUPPRESS)
    a("--warmup-ratio", "--warmup_ratio", type=float, default=d.warmup_ratio, help=f"default {d.warmup_ratio}")
    a("--weight-decay", "--weight_decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    a("--max-grad-norm", "--max_grad_norm", type=float, default=d.max_grad_norm,
      help=f"gradient clipping, 0 for none (default {d.max_grad_norm})")
    a("--lora-dropout", "--lora_dropout", type=float, default=d.lora_dropout, help=f"dropout on expert inputs (default {d.lora_dropout})")
    a("--aux-loss-coef", type=float, default=d.aux_loss_coef, help="load-balancing loss weight (default 0: off)")
    a("--target-modules", "--lora_target_modules", default=None,
      help="comma-separated module names to wrap (default: every module the experts cover)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps (default: each epoch)")
    a("--save-total-limit", type=int, default=d.save_total_limit, help="checkpoints kept (default 2)")
    a("--cuda-graphs", action="store_true",
      help="capture each micro-batch shape's forward and backward in a CUDA graph and replay it (plain torch "
           "loop on one GPU; removes the host's launch cost, which bounds small micro-batches)")
    a("--resume", "--resume_from_checkpoint", nargs="?", const=True, default=False,
      help="continue from the latest checkpoint in --out, or from the checkpoint directory given")
    a("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="rocket train: %(message)s")
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, cutoff=args.cutoff, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, top_k=args.top_k, train_router_only=args.train_router_only,
                      template=args.template, overflow=args.overflow, group_by_length=args.group_by_length,
                      pad_to_multiple=args.pad_to_multiple,
                      warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm, lora_dropout=args.lora_dropout,
                      aux_loss_coef=args.aux_loss_coef, target_modules=targets, seed=args.seed,
                      max_steps=args.max_steps, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
                      cuda_graphs=args.cuda_graphs)
    result = train(args.base_model, args.data, args.experts, args.out, tokenizer=args.tokenizer, config=cfg,
                   deepspeed_config=args.deepspeed, backend=args.backend, device=args.device, resume=args.resume,
                   progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = (result.losses[0], result.losses[-1]) if result.losses else (float("nan"),) * 2
        print(f"trained {result.steps} steps ({result.backend}); loss {first:.4f} → {last:.4f}; "
              f"wrote {Path(args.out)}")
    return 0
