"""The `rocket` command: rationale, score, select, augment, train, eval, run, demo.

Each subcommand lives in its stage module, which provides `add_arguments(parser)` and
`main(args)`; only the chosen stage is imported, so `rocket --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

COMMANDS = {
    "rationale": ("rocket.rationale.cli", "K-shot items with a generated rationale after the gold answer (for scoring)"),
    "score": ("rocket.scoring.cli", "stage 1: perplexity (and accuracy) of every adapter of a bank on K-shot data"),
    "select": ("rocket.selection.cli", "stage 2: choose the best, most diverse N adapters"),
    "augment": ("rocket.augment.cli", "stage 3: select open data similar to the K-shot set, remove near-duplicates"),
    "train": ("rocket.training.cli",
              "stage 4: train the LoRA mixture of experts (plain torch in one process, DeepSpeed in several)"),
    "eval": ("rocket.evaluation.cli", "the trained MoE against the base model and each expert on held-out data"),
    "run": ("rocket.pipeline.cli", "score → select → augment → train in one run directory"),
    "demo": ("rocket.demo", "the whole pipeline on the embedded default (tiny model, synthetic task)"),
}


from rocket.errors import RocketError


class CLIError(RocketError):
    """A user error in the command line itself."""


def _chosen(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rocket", description="ROCKET: K-shot data → task expert from open "
                                     "LoRA adapters and open instruction data (arXiv 2408.15915).")
    from rocket import __version__
    parser.add_argument("--version", action="version", version=f"rocket {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
            p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
            import_module(module).add_arguments(p)
    return parser


def resolve_device(name: str | None):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is available")
    return device


def quiet_libraries() -> None:
    """--no-progress: no progress bars from transformers and the hub either (model loading)."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _chosen(argv)
    args = build_parser(command).parse_args(argv)
    try:
        args.device = resolve_device(args.device)
        import torch
        torch.manual_seed(args.seed)
        if getattr(args, "no_progress", False):
            quiet_libraries()
        return import_module(COMMANDS[args.command][0]).main(args) or 0
    except (RocketError, FileNotFoundError) as e:
        # rocket's own errors are one line and name their subject: no traceback for the user.
        print(f"rocket {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
