"""`rocket eval`: the trained LoRA-MoE against the base model and each expert on held-out data."""
from rocket.evaluation.compare import EvalRow, EvalTable, evaluate, evaluate_files

__all__ = ["EvalRow", "EvalTable", "evaluate", "evaluate_files"]
