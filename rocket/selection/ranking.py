"""Stage 2: choose the N best, most diverse adapters (docs/design.md, 'Ranks', 'Group
diversity').

R_P ranks adapters by PPL_R ascending, R_A by accuracy descending (ties share the smallest rank);
the top M by R_P + R_A are kept (adapters with ΔW = 0 set aside); every N-tuple S of them gets
R_D(S), the rank of its mean pairwise |ΔW cosine| (least aligned first); the tuple minimising
Σ_{m∈S}(R_P + R_A) + R_D(S) is chosen.

The experts manifest (`Selection.save`, `rocket select --out experts.txt`; what `rocket train
--experts` reads): UTF-8 text, newline-terminated lines; first a `#` comment line saying what wrote
it, then one chosen adapter's directory per line, an absolute path, in bank order. Readers
(rocket.adapters.bank) skip blank and `#` lines, resolve relative paths against the manifest's
directory and also accept a weights file per line, as in the reference implementation's manifests
(`.../adapter_model.bin`).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import torch
from rocket import __version__
from rocket.adapters.bank import LoraAdapter, LoraBank, bank_entries, load_adapter
from rocket.data.scores import BASE_LABEL, Scores, format_ppl, read_accuracy
from rocket.adapters.similarity import _similarity, has_delta, unshared_pairs
from rocket.errors import SelectionError
from rocket.io import atomic_write



# Enumerating C(M, N) tuples is exhaustive by design; past this many the user should lower M.
MAX_TUPLES = 20_000_000




# --------------------------------------------------------------------------- ranks and tuples
def rank_min(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ascending, ties sharing the smallest rank (scipy rankdata(method='min'))."""
    ordered = torch.sort(values).values
    return torch.searchsorted(ordered, values.contiguous(), right=False) + 1


def combinations(m: int, k: int) -> torch.Tensor:
    """All k-subsets of range(m) as sorted rows, in lexicographic order: LongTensor [C(m, k), k].
    Built by extending prefixes (memory ∝ output, unlike torch.combinations' m^k grid)."""
    tuples = torch.arange(m - k + 1).unsqueeze(1)
    for pos in range(1, k):
        last = tuples[:, -1]
        counts = (m - k + pos) - last              # next element ranges over (last, m-k+pos]
        rows = tuples.repeat_interleave(counts, dim=0)
        starts = torch.cumsum(counts, 0) - counts
        offset = torch.arange(rows.shape[0]) - starts.repeat_interleave(counts)
        tuples = torch.cat([rows, (rows[:, -1] + 1 + offset).unsqueeze(1)], dim=1)
    return tuples


def tuple_similarity(sim: torch.Tensor, tuples: torch.Tensor) -> torch.Tensor:
    """Mean pairwise |similarity| of each tuple [T, k] over the matrix `sim` (NaN pairs count as 0).
    The absolute value, as the reference implementation takes it: an anti-aligned pair is as
    redundant as an aligned one, an orthogonal pair is the most diverse. Pair values are sorted
    before summing, so tuples with equal pair values tie bit-exactly."""
    k = tuples.shape[1]
    if k < 2:
        return torch.zeros(tuples.shape[0], dtype=torch.float64)
    a, b = torch.triu_indices(k, k, offset=1)
    pairs = torch.nan_to_num(sim.double().abs(), nan=0.0)[tuples[:, a], tuples[:, b]]   # [T, P]
    return torch.sort(pairs, dim=1).values.sum(dim=1) / pairs.shape[1]


@dataclass
class Selection:
    """The chosen experts and why: the full ranking table and every tuple's objective.

    `table` has one row per candidate adapter (bank order); `top` are the M prefiltered names in
    bank order, which is also the order of `similarity` [M, M] and of the columns of `tuples`
    (positions into `top`). tuple_sim / r_d / rank_sum / objective are per tuple [T]; `paths` are
    the experts' adapter directories (absolute), the lines of the manifest `save` writes. `base`:
    the base model's PPL_R and accuracy when the scores hold them, shown for reference, never ranked."""
    experts: list[str]
    paths: list[str]
    table: list[dict]
    top: list[str]
    similarity: torch.Tensor
    tuples: torch.Tensor
    tuple_sim: torch.Tensor
    r_d: torch.Tensor
    rank_sum: torch.Tensor
    objective: torch.Tensor
    best: int
    uses_accuracy: bool
    unshared: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base: dict | None = None

    def manifest(self) -> str:
        """The experts manifest (see the module docstring): a header, then `paths`, one per line."""
        return (f"# experts chosen by rocket {__version__} (select): one adapter directory per line\n"
                + "".join(f"{p}\n" for p in self.paths))

    def save(self, path: str | Path) -> Path:
        """Write the experts manifest to `path` atomically; `rocket train --experts` reads it."""
        return atomic_write(path, self.manifest())

    def tuple_names(self, row: int) -> list[str]:
        return [self.top[p] for p in self.tuples[row].tolist()]

    def ranked_tuples(self, limit: int | None = None) -> list[dict]:
        """Tuples by objective (ties: lexicographic, as chosen), best first."""
        order = sorted(range(len(self.objective)), key=lambda t: (int(self.objective[t]), t))
        return [{"adapters": self.tuple_names(t), "rank_sum": int(self.rank_sum[t]),
                 "similarity": float(self.tuple_sim[t]), "R_D": int(self.r_d[t]),
                 "objective": int(self.objective[t])} for t in order[:limit]]

    def to_json(self, max_tuples: int = 100) -> dict:
        sim = [[None if math.isnan(v) else v for v in row] for row in self.similarity.tolist()]
        return {"experts": self.experts, "paths": self.paths,
                "objective": int(self.objective[self.best]),
                "uses_accuracy": self.uses_accuracy, "notes": self.notes,
                "ranking": self.table, "top_m": self.top, "similarity": sim,
                "pairs_sharing_no_module": [list(p) for p in self.unshared],
                "tuples_total": len(self.objective), "tuples": self.ranked_tuples(max_tuples), "base": self.base}

    def format_table(self) -> str:
        """The ranking table as aligned text (what `rocket select` prints); the base model's row, when
        known, first and unranked."""
        head = f"{'adapter':<28} {'PPL_R':>12} {'acc':>6} {'R_P':>4} {'R_A':>4} {'sum':>4}  top-M  chosen"
        lines = [head]
        if self.base is not None:
            acc = "-" if self.base["accuracy"] is None else f"{self.base['accuracy']:.3f}"
            lines.append(f"{BASE_LABEL:<28} {format_ppl(self.base['ppl_sum']):>12} {acc:>6} {'-':>4} {'-':>4} "
                         f"{'-':>4}")
        for row in sorted(self.table, key=lambda r: (r["top_m"] is None, r["top_m"] or 0)):
            acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
            ra = "-" if row["R_A"] is None else str(row["R_A"])
            top = "" if row["top_m"] is None else str(row["top_m"])
            lines.append(f"{row['name'][:28]:<28} {format_ppl(row['ppl_sum']):>12} {acc:>6} {row['R_P']:>4} {ra:>4} "
                         f"{row['rank_sum']:>4}  {top:>5}  {'*' if row['chosen'] else ''}")
        return "\n".join(lines)


def _as_accuracy(acc, names: list[str]) -> torch.Tensor:
    if isinstance(acc, (str, Path)):
        return read_accuracy(acc, names)
    if isinstance(acc, dict):
        missing = [n for n in names if n not in acc]
        if missing:
            raise SelectionError(f"accuracy: no value for adapter '{missing[0]}'")
        acc = [acc[n] for n in names]
    acc = torch.as_tensor(acc, dtype=torch.float64).flatten()
    if acc.shape != (len(names),):
        raise SelectionError(f"accuracy: {acc.shape[0]} values for {len(names)} scored adapters")
    return acc


def _adapter_dir(adapter: LoraAdapter) -> str:
    """The manifest line of an adapter: its directory as an absolute path (symbolic links kept, so
    the directory name, the adapter's name when read back, stays the same)."""
    return os.path.abspath(adapter.path)


def select_experts(scores: Scores, bank: LoraBank | str | Path, acc=None, top_m: int = 8, n_experts: int = 4,
                   *, device=None, progress: bool = False) -> Selection:
    """Choose `n_experts` adapters: ranks R_P (PPL_R ascending) and R_A (accuracy descending; from
    `acc` — tensor/list in `scores.names` order, dict, or JSON path — else `scores.accuracy`, else
    omitted), top `top_m` by R_P + R_A, then the N-tuple minimising Σ(R_P + R_A) + R_D.

    `bank` may be a LoraBank or a bank path; with a path only the top M adapters are loaded."""
    names = list(scores.names)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SelectionError(f"scores: adapter '{dup}' appears twice")
    if isinstance(bank, (str, Path)):
        entries = bank_entries(bank)
        bank_names = [name for name, _ in entries]
    elif isinstance(bank, LoraBank):
        bank_names = bank.names
    else:
        raise SelectionError(f"bank: expected a LoraBank or a path, got {type(bank).__name__}")
    position = {name: i for i, name in enumerate(bank_names)}
    unknown = [n for n in names if n not in position]
    if unknown:
        raise SelectionError(f"scores name {len(unknown)} adapter(s) not in the bank, e.g. '{unknown[0]}' "
                             f"(bank has {len(bank_names)}: {', '.join(bank_names[:4])}{' …' if len(bank_names) > 4 else ''})")
    if not isinstance(n_experts, int) or n_experts < 1:
        raise SelectionError(f"n_experts must be a positive integer, got {n_experts!r}")
    if not isinstance(top_m, int) or top_m < 1:
        raise SelectionError(f"top_m must be a positive integer, got {top_m!r}")
    if n_experts > top_m:
        raise SelectionError(f"n_experts={n_experts} > top_m={top_m}: the tuple is chosen among the top M")
    if n_experts > len(names):
        raise SelectionError(f"n_experts={n_experts} but only {len(names)} adapters are scored")

    # Candidates in bank order: "adapter order" of the tie rules is the bank's.
    order = sorted(range(len(names)), key=lambda k: position[names[k]])
    cand = [names[k] for k in order]
    ppl = scores.ppl_sum[order]
    if not torch.isfinite(ppl).all():
        raise SelectionError(f"scores: PPL_R of '{cand[int((~torch.isfinite(ppl)).nonzero()[0])]}' is not finite")
    accuracy = scores.accuracy if acc is None else _as_accuracy(acc, names)
    notes = []
    if accuracy is not None:
        accuracy = accuracy[order]
        if not torch.isfinite(accuracy).all():
            raise SelectionError("accuracy: non-finite values")
    else:
        notes.append("no accuracy given: R_A omitted, adapters ranked by R_P only")
    r_p = rank_min(ppl)
    r_a = rank_min(-accuracy) if accuracy is not None else torch.zeros_like(r_p)
    score = r_p + r_a

    # The top M by R_P + R_A (ties: lower R_P, then bank order), loading adapters in that order only
    # as far as needed; an adapter whose ΔW is 0 on every module (untrained, B = 0) has no defined
    # cosine and would look maximally diverse, so it is set aside with a warning.
    paths = dict(entries) if not isinstance(bank, LoraBank) else None
    top_pos, loaded, zero = [], {}, []
    for k in sorted(range(len(cand)), key=lambda k: (int(score[k]), int(r_p[k]), k)):
        if len(top_pos) == top_m:
            break
        adapter = bank[cand[k]] if paths is None else load_adapter(paths[cand[k]], name=cand[k])
        if has_delta(adapter):
            top_pos.append(k)
            loaded[cand[k]] = adapter
        else:
            zero.append(cand[k])
    if zero:
        warnings.warn(f"select_experts: {len(zero)} adapter(s) with ΔW = 0 on every module set aside "
                      f"(no direction to compare): {', '.join(zero)}", stacklevel=2)
        notes.append(f"set aside, ΔW = 0 on every module: {', '.join(zero)}")
    if len(top_pos) < n_experts:
        raise SelectionError(f"n_experts={n_experts} but only {len(top_pos)} scored adapters have a non-zero ΔW")
    m = len(top_pos)
    if m < top_m:
        notes.append(f"top_m={top_m} but {m} adapters are eligible: all are kept")
    top_idx = sorted(top_pos)  # bank order: tuples are enumerated lexicographically in it
    n_tuples = math.comb(m, n_experts)
    if n_tuples > MAX_TUPLES:
        raise SelectionError(f"C({m}, {n_experts}) = {n_tuples} tuples exceed {MAX_TUPLES}: lower top_m")

    top_names = [cand[k] for k in top_idx]
    sub = LoraBank([loaded[n] for n in top_names])
    sim, shared = _similarity(sub, device, progress=progress)
    unshared = unshared_pairs(top_names, shared)
    if unshared:
        notes.append(f"{len(unshared)} pair(s) of the top M share no module where both have a non-zero ΔW: "
                     "their similarity counts as 0 (ΔW on disjoint modules are orthogonal)")

    tuples = combinations(m, n_experts)
    tuple_sim = tuple_similarity(sim, tuples)
    r_d = rank_min(tuple_sim)
    rank_sum = score[torch.tensor(top_idx)][tuples].sum(dim=1)
    objective = rank_sum + r_d
    best = int((objective == objective.min()).nonzero()[0])   # first = lexicographically smallest
    chosen = set(tuples[best].tolist())
    experts = [top_names[p] for p in sorted(chosen)]
    top_rank = {k: i + 1 for i, k in enumerate(top_pos)}
    table = [{"name": cand[k], "ppl_sum": float(ppl[k]),
              "accuracy": None if accuracy is None else float(accuracy[k]),
              "R_P": int(r_p[k]), "R_A": None if accuracy is None else int(r_a[k]),
              "rank_sum": int(score[k]), "top_m": top_rank.get(k),
              "chosen": cand[k] in experts} for k in range(len(cand))]
    # the base model is a reference row only: it was never a candidate above
    base = None if scores.base_loss is None else {
        "ppl_sum": scores.base_ppl_sum, "accuracy": scores.base_accuracy if acc is None else None}
    return Selection(experts, [_adapter_dir(sub[n]) for n in experts], table, top_names, sim, tuples,
                     tuple_sim, r_d, rank_sum, objective, best, accuracy is not None, unshared, notes, base)
