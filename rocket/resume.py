"""What makes a stage's output reusable: fingerprints of input files, digests of options, stamps;
and what identifies a base model: its content fingerprint."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
import torch
from rocket.io import read_json, write_json
from rocket.errors import RocketError


STAMP_DIR = ".rocket"


# --------------------------------------------------------------------------- stamps
def fingerprint(path: str | Path) -> list:
    """Cheap identity of an input file or directory: relative name, size and mtime of every file."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if path.is_dir():
        out = []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
        return out
    raise RocketError(f"{path}: no such file or directory")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stamps:
    """The stamps of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / STAMP_DIR

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def read(self, stage: str) -> dict | None:
        try:
            return json.loads(self.path(stage).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def clear(self, stage: str) -> None:
        self.path(stage).unlink(missing_ok=True)

    def write(self, stage: str, key: str, outputs: list[str], seconds: float, summary: dict) -> None:
        write_json(self.path(stage), {"stage": stage, "key": key, "outputs": outputs, "seconds": seconds,
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      "summary": summary})


# --------------------------------------------------------------------------- base models
# config.json keys that record how a model was saved or loaded, not what it computes.
SAVE_KEYS = {"transformers_version", "dtype", "torch_dtype", "architectures"}
SAMPLE = 4096  # elements sampled per parameter


def _model_config(model) -> dict | None:
    """The config.json the model was loaded from (`config.name_or_path`), else the one
    save_pretrained would write (a model built in memory); None for a model without a config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    file = Path(config.name_or_path) / "config.json" if config.name_or_path else None
    cfg = read_json(file) if file is not None and file.is_file() else config.to_diff_dict()
    return {k: v for k, v in cfg.items() if k not in SAVE_KEYS and not k.startswith("_")}


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What identifies a base model's content, cheap to compute and the same on every machine and
    device (docs/design.md §3, 'Trained MoE directory'), three digests: `config`, of its config.json
    less SAVE_KEYS and `_` keys (see _model_config); `shapes`, of every parameter's name and shape;
    `samples`, of a strided sample of every parameter (elements 0, s, 2s, … with s = ⌊numel/4096⌋
    + 1, at most 4096) rounded to bfloat16 with |x| < 2⁻¹⁴ set to 0, so that float32, bfloat16 and
    float16 loads of the same weights agree (but for a float16 load of float32 weights, which rounds
    twice). Parameters are taken in name order; tied ones count once."""
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    h = hashlib.sha256()
    for _, p in params:
        flat = p.detach().reshape(-1)
        x = flat[:: flat.numel() // SAMPLE + 1].to(torch.bfloat16)
        x = torch.where(x.abs() < 2.0 ** -14, torch.zeros_like(x), x)
        h.update(x.cpu().view(torch.int16).numpy().tobytes())
    return {"config": digest(_model_config(model)), "shapes": digest([[name, list(p.shape)] for name, p in params]),
            "samples": h.hexdigest()[:16]}
