"""The scores of stage 1 (scores.json): loss/ppl per adapter and example, accuracy per adapter, and
the same for the base model alone (a reference row, never ranked); written by scoring, read by
selection and the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
import torch
from rocket.errors import DataError
from rocket.io import read_json, write_json


BASE_LABEL = "(base model)"   # how tables and the heatmap name the base model's row


def format_ppl(value: float) -> str:
    """PPL_R as every table and summary line prints it: two decimals, scientific (4 significant
    digits) from 10⁷ on, where decimals mean nothing (docs/design.md, 'The base model's row')."""
    value = float(value)
    return f"{value:.2f}" if math.isfinite(value) and abs(value) < 1e7 else f"{value:.3e}"


def _finite_numbers(row) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row)


@dataclass
class Scores:
    """Per-adapter scores on K examples: loss/ppl [N, K] (nats, exp), ppl_sum [N] = PPL_R,
    accuracy [N] in [0, 1] or None. `names` orders the rows. base_loss [K] / base_accuracy: the
    base model alone on the same examples (None in files written before rocket scored it): a
    reference for the reader, never a candidate of selection."""
    names: list[str]
    loss: torch.Tensor
    accuracy: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    base_loss: torch.Tensor | None = None
    base_accuracy: float | None = None

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
        if self.base_loss is not None:
            self.base_loss = torch.as_tensor(self.base_loss, dtype=torch.float64)
            if self.base_loss.shape != (self.loss.shape[1],):
                raise DataError(f"scores: base_loss has shape {tuple(self.base_loss.shape)}, "
                                f"expected ({self.loss.shape[1]},), one value per example")
        if self.base_accuracy is not None:
            self.base_accuracy = float(self.base_accuracy)

    @property
    def base_ppl_sum(self) -> float | None:
        """PPL_R of the base model alone (None when it was not scored)."""
        return None if self.base_loss is None else float(torch.exp(self.base_loss).sum())

    def below_base(self) -> int | None:
        """How many adapters have a lower PPL_R than the base model alone (None when it was not scored)."""
        return None if self.base_loss is None else int((self.ppl_sum < self.base_ppl_sum).sum())

    def worse_than_base(self) -> list[str]:
        """The adapters that only hurt: a higher loss than the base model on every example, and an
        accuracy no better than the base model's (not compared when either is missing). Empty when
        the base model was not scored."""
        if self.base_loss is None:
            return []
        worse = (self.loss > self.base_loss).all(dim=1)
        if self.accuracy is not None and self.base_accuracy is not None:
            worse &= self.accuracy <= self.base_accuracy
        return [n for n, w in zip(self.names, worse.tolist()) if w]

    def unhelpful(self) -> tuple[list[str], list[str]]:
        """(the adapters whose ΔW is 0 on every module, as scoring found them: meta 'zero_delta'; the
        other adapters worse than the base model) — what scoring warns about and the report lists."""
        zero = list(self.meta.get("zero_delta") or [])
        return zero, [n for n in self.worse_than_base() if n not in zero]

    @property
    def ppl(self) -> torch.Tensor:
        return torch.exp(self.loss)

    @property
    def ppl_sum(self) -> torch.Tensor:
        return self.ppl.sum(dim=1)

    def to_json(self) -> dict:
        base = None if self.base_loss is None else {
            "loss": self.base_loss.tolist(), "ppl": torch.exp(self.base_loss).tolist(), "ppl_sum": self.base_ppl_sum,
            "accuracy": self.base_accuracy}
        return {"adapters": self.names, "examples": self.loss.shape[1], "loss": self.loss.tolist(),
                "ppl": self.ppl.tolist(), "ppl_sum": self.ppl_sum.tolist(),
                "accuracy": None if self.accuracy is None else self.accuracy.tolist(), "base": base,
                "meta": self.meta}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        return cls.from_json(read_json(Path(path), DataError), Path(path))

    @classmethod
    def from_json(cls, obj, path: str | Path) -> "Scores":
        """Scores from a scores file's parsed JSON; errors name `path`, the file it came from."""
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
            if not _finite_numbers(row):
                raise DataError(f"{path}: 'loss' row {i} ('{names[i]}') has a non-finite or non-numeric value")
        base, base_loss, base_acc = obj.get("base"), None, None  # no 'base': written before rocket scored it
        if base is not None and loss:
            row = base.get("loss") if isinstance(base, dict) else None
            if not isinstance(row, list) or len(row) != len(loss[0]) or not _finite_numbers(row):
                raise DataError(f"{path}: field 'base' must hold 'loss', {len(loss[0])} finite values (the base "
                                "model's loss per example)")
            base_loss, base_acc = torch.tensor(row, dtype=torch.float64), base.get("accuracy")
            if base_acc is not None and (isinstance(base_acc, bool) or not isinstance(base_acc, (int, float))
                                         or not 0.0 <= base_acc <= 1.0):
                raise DataError(f"{path}: the base model's accuracy must be a number in [0, 1] or null, "
                                f"got {base_acc!r}")
        return cls(list(obj["adapters"]), torch.tensor(loss, dtype=torch.float64), obj.get("accuracy"),
                   obj.get("meta", {}), base_loss, base_acc)


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
