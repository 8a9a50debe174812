"""rocket: K-shot data → task expert, by reusing open LoRA adapters and open instruction data.

The public API is imported lazily so that a stage's optional dependencies (faiss, deepspeed,
sentence-transformers) are needed only by that stage.
"""
from importlib import import_module

# The extension rocket._C links against torch's shared libraries (libc10, libtorch), which only
# `import torch` loads: importing it here lets `import rocket._C` work on its own.
import torch  # noqa: F401

__version__ = "0.1.0"

_API = {
    "LoraBank": "rocket.adapters",
    "LoraAdapter": "rocket.adapters",
    "LoraMoELinear": "rocket.moe",
    "inject_lora_moe": "rocket.moe",
    "moe_aux_loss": "rocket.moe",
    "save_moe": "rocket.moe",
    "save_moe_state": "rocket.moe",
    "load_moe_state": "rocket.moe",
    "load_moe": "rocket.moe",
    "generate_rationales": "rocket.rationale",
    "score_adapters": "rocket.scoring",
    "Scores": "rocket.data",
    "select_experts": "rocket.selection",
    "Selection": "rocket.selection",
    "group_similarity": "rocket.adapters",
    "embed_texts": "rocket.augment",
    "select_data": "rocket.augment",
    "dedup": "rocket.augment",
    "train": "rocket.training",
    "TrainConfig": "rocket.training",
    "evaluate": "rocket.evaluation",
    "EvalTable": "rocket.evaluation",
    "load_examples": "rocket.data",
    "run_pipeline": "rocket.pipeline",
    "RunConfig": "rocket.pipeline",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rocket' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
