"""The scores of stage 1 (scores.json): loss/ppl per adapter and example, accuracy per adapter;
written by scoring, read by selection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
import torch
from rocket.errors import DataError
from rocket.io import read_json, write_json


@dataclass
class Scores:
    """Per-adapter scores on K examples: loss/ppl [N, K] (nats, exp), ppl_sum [N] = PPL_R,
    accuracy [N] in [0, 1] or None. `names` orders the rows."""
    names: list[str]
    loss: torch.Tensor
    accuracy: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.loss = torch.as_tensor(self.loss, dtype=torch.float64)
        if self.loss.dim() != 2 or self.loss.shape[0] != len(self.names):
            raise DataError(f"scores: loss has shape {tuple(self.loss.shape)}, expected "
                              f"[{len(self.names)} adapters, K examples]")
        if self.accuracy is not None:
            self.accuracy = torch.as_tensor(self.accuracy, dtype=torch.float64)
            if self.accuracy.shape != (len(self.names),):
                raise DataError(f"scores: accuracy has shape {tuple(self.accuracy.shape)}, "
                                  f"expected ({len(self.names)},)")

    @property
    def ppl(self) -> torch.Tensor:
        return torch.exp(self.loss)

    @property
    def ppl_sum(self) -> torch.Tensor:
        return self.ppl.sum(dim=1)

    def to_json(self) -> dict:
        return {"adapters": self.names, "examples": self.loss.shape[1], "loss": self.loss.tolist(),
                "ppl": self.ppl.tolist(), "ppl_sum": self.ppl_sum.tolist(),
                "accuracy": None if self.accuracy is None else self.accuracy.tolist(), "meta": self.meta}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        path = Path(path)
        obj = read_json(path, DataError)
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a JSON object (a rocket scores file)")
        for key in ("adapters", "loss"):
            if key not in obj:
                raise DataError(f"{path}: missing field '{key}'")
        loss, names = obj["loss"], obj["adapters"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: field 'adapters' must be a list of names")
        if not isinstance(loss, list) or len(loss) != len(names):
            raise DataError(f"{path}: field 'loss' must have one row per adapter ({len(names)})")
        for i, row in enumerate(loss):
            if not isinstance(row, list) or len(row) != len(loss[0]) or not row:
                raise DataError(f"{path}: 'loss' row {i} ('{names[i]}') has {len(row) if isinstance(row, list) else 'no'} "
                                f"values, row 0 has {len(loss[0]) if isinstance(loss[0], list) else 'none'}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row):
                raise DataError(f"{path}: 'loss' row {i} ('{names[i]}') has a non-finite or non-numeric value")
        return cls(list(obj["adapters"]), torch.tensor(loss, dtype=torch.float64), obj.get("accuracy"),
                   obj.get("meta", {}))


def read_accuracy(path: str | Path, names: list[str]) -> torch.Tensor:
    """Accuracy per adapter from a JSON {adapter name: accuracy in [0, 1]}, in `names` order."""
    path = Path(path)
    obj = read_json(path, DataError)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object {{adapter: accuracy}}")
    out = []
    for name in names:
        if name not in obj:
            raise DataError(f"{path}: no accuracy for adapter '{name}'")
        v = obj[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise DataError(f"{path}: accuracy of '{name}' must be a number in [0, 1], got {v!r}")
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float64)
