"""Stage 2: choose the N best, most diverse adapters (DESIGN.md §3 'Ranks', 'Group diversity').

R_P ranks adapters by PPL_R ascending, R_A by accuracy descending (ties share the smallest rank);
the top M by R_P + R_A are kept; every N-tuple S of them gets R_D(S), the rank of its mean pairwise
ΔW cosine (least similar first); the tuple minimising Σ_{m∈S}(R_P + R_A) + R_D(S) is chosen.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rocket.bank import BankError, LoraAdapter, LoraBank, _manifest_entries, _weights_file, load_adapter
from rocket.errors import RocketError
from rocket.scoring import Scores, read_accuracy


class SelectionError(RocketError):
    """Scores, bank and selection parameters that do not fit together."""


# Enumerating C(M, N) tuples is exhaustive by design; past this many the user should lower M.
MAX_TUPLES = 20_000_000


# --------------------------------------------------------------------------- group similarity
def _similarity(bank: LoraBank, device=None, block_rows: int = 4096, progress: bool = False):
    """(cos [N, N] float64 CPU, NaN where undefined; shared [N, N] module counts) of ΔW = s·B·A.

    Per module, the rows of all adapters' A (and of Bᵀ) are stacked into X_A [Σr, d_in] and
    X_B [Σr, d_out]; with G = X Xᵀ, <B_iA_i, B_jA_j>_F = Σ_{a∈i, b∈j} G_A[a, b]·G_B[a, b], i.e. the
    (i, j) block sum of G_A∘G_B: two Gram GEMMs give every pair's r×r trace at once. Cosine does
    not depend on the (positive) scalings, so they are not applied. A module an adapter does not
    cover, or covers with ΔW = 0 (an untrained B), is skipped for that adapter's pairs."""
    adapters = bank.adapters
    n = len(adapters)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    cos_sum = torch.zeros(n, n, dtype=torch.float64, device=device)
    shared = torch.zeros(n, n, dtype=torch.int64, device=device)
    modules = bank.modules
    if progress:
        from tqdm.auto import tqdm
        modules = tqdm(modules, desc="ΔW similarity", unit="module")
    for module in modules:
        idx = [i for i, a in enumerate(adapters) if module in a.weights]
        XA, XB, rows = _stack_rows(adapters, idx, module, device)
        inner = _block_inner(XA, XB, rows, block_rows)                 # [n_m, n_m] float64
        norm2 = inner.diagonal()
        valid = norm2 > 0
        cos = inner / (norm2.clamp_min(1e-300).sqrt()[:, None] * norm2.clamp_min(1e-300).sqrt()[None, :])
        pair = valid[:, None] & valid[None, :]
        if len(idx) == n:  # every adapter covers the module: no index (and no host→device copy)
            cos_sum += torch.where(pair, cos.clamp(-1, 1), 0.0)
            shared += pair.long()
            continue
        sel = torch.tensor(idx)
        sel = (sel.pin_memory() if device.type == "cuda" else sel).to(device, non_blocking=True)
        cos_sum[sel[:, None], sel[None, :]] += torch.where(pair, cos.clamp(-1, 1), 0.0)
        shared[sel[:, None], sel[None, :]] += pair.long()
    cos = torch.where(shared > 0, cos_sum / shared.clamp_min(1), float("nan"))
    return cos.cpu(), shared.cpu()


def _compute_dtype(dtypes: set, device: torch.device) -> torch.dtype:
    if torch.float64 in dtypes:
        return torch.float64
    if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} and device.type == "cuda":
        return dtypes.pop()  # tensor-core GEMM with a float32 output (_gram)
    return torch.float32


def _stack_rows(adapters: list[LoraAdapter], idx: list[int], module: str, device):
    """Rows of A [r, d_in] and of Bᵀ [r, d_out] of adapters `idx`, zero-padded to the largest rank r
    of the module so that pair blocks are equal-sized: XA [n, r, d_in], XB [n, r, d_out]."""
    first = adapters[idx[0]]
    d_in, d_out = first.weights[module][0].shape[1], first.weights[module][1].shape[0]
    for i in idx:
        A, B = adapters[i].weights[module]
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise BankError(f"adapter '{adapters[i].name}': module '{module}' is {A.shape[1]}→{B.shape[0]}, "
                            f"adapter '{first.name}' has {d_in}→{d_out}")
    dtype = _compute_dtype({t.dtype for i in idx for t in adapters[i].weights[module]}, device)
    ranks = [adapters[i].rank(module) for i in idx]
    r = max(ranks)
    if min(ranks) == r:  # the common case: one batched copy each, no per-adapter conversions
        pairs = [adapters[i].weights[module] for i in idx]
        XA = torch.stack([A for A, _ in pairs]).to(device=device, dtype=dtype)
        XB = torch.stack([B for _, B in pairs]).to(device=device, dtype=dtype).transpose(1, 2)
        return XA, XB.contiguous(), r
    XA = torch.zeros(len(idx), r, d_in, dtype=dtype, device=device)
    XB = torch.zeros(len(idx), r, d_out, dtype=dtype, device=device)
    for rank in sorted(set(ranks)):  # one batched copy per distinct rank
        pos = [k for k, rk in enumerate(ranks) if rk == rank]
        As = torch.stack([adapters[idx[k]].weights[module][0].to(dtype) for k in pos]).to(device)
        Bs = torch.stack([adapters[idx[k]].weights[module][1].to(dtype) for k in pos]).to(device)
        where = torch.tensor(pos, device=device)
        XA[where, :rank] = As
        XB[where, :rank] = Bs.transpose(1, 2)
    return XA, XB, r


def _gram(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """X Yᵀ in float32 (or float64); half-precision inputs use tensor cores with a float32 output."""
    if X.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(X, Y.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=): upcast instead
            return X.float() @ Y.float().T
    return X @ Y.T


def _block_inner(XA: torch.Tensor, XB: torch.Tensor, r: int, block_rows: int) -> torch.Tensor:
    """All pairwise <B_iA_i, B_jA_j>_F [n, n] float64, in blocks of adapters so Gram tiles stay
    ≤ block_rows² elements; only blocks on and above the diagonal are computed (symmetry)."""
    n = XA.shape[0]
    step = max(1, block_rows // r)
    starts = list(range(0, n, step))
    out = torch.empty(n, n, dtype=torch.float64, device=XA.device)
    flatA, flatB = XA.reshape(n * r, -1), XB.reshape(n * r, -1)
    for bi, i0 in enumerate(starts):
        i1 = min(i0 + step, n)
        for j0 in starts[bi:]:
            j1 = min(j0 + step, n)
            P = _gram(flatA[i0 * r:i1 * r], flatA[j0 * r:j1 * r])
            P *= _gram(flatB[i0 * r:i1 * r], flatB[j0 * r:j1 * r])
            # r² terms per pair: float32 sums, innermost (contiguous) dimension first
            block = P.view(i1 - i0, r, j1 - j0, r).sum(dim=3).sum(dim=1).double()
            out[i0:i1, j0:j1] = block
            out[j0:j1, i0:i1] = block.T
    return (out + out.T) / 2  # diagonal tiles are symmetric only up to GEMM rounding: make it exact


def group_similarity(bank: LoraBank, device=None, *, block_rows: int = 4096, progress: bool = False) -> torch.Tensor:
    """N×N mean per-module cosine similarity of the adapters' ΔW = s·B·A (float64, CPU).

    Computed with r×r traces (two Gram GEMMs per module, never a d_out×d_in matrix), on `device`
    (default: CUDA when available). Modules not shared by a pair are skipped; a pair sharing none
    gets NaN and a warning names it."""
    cos, shared = _similarity(bank, device, block_rows, progress)
    lonely = _unshared_pairs(bank.names, shared)
    if lonely:
        shown = ", ".join(f"{a}/{b}" for a, b in lonely[:5])
        warnings.warn(f"group_similarity: {len(lonely)} adapter pair(s) share no (non-zero) module, "
                      f"similarity NaN: {shown}{' …' if len(lonely) > 5 else ''}", stacklevel=2)
    return cos


def _unshared_pairs(names: list[str], shared: torch.Tensor) -> list[tuple[str, str]]:
    i, j = torch.triu_indices(len(names), len(names), offset=1)
    none = shared[i, j] == 0
    return [(names[a], names[b]) for a, b in zip(i[none].tolist(), j[none].tolist())]


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
    """Mean pairwise similarity of each tuple [T, k] over the matrix `sim` (NaN pairs count as 0).
    Pair values are sorted before summing, so tuples with equal pair values tie bit-exactly."""
    k = tuples.shape[1]
    if k < 2:
        return torch.zeros(tuples.shape[0], dtype=torch.float64)
    a, b = torch.triu_indices(k, k, offset=1)
    pairs = torch.nan_to_num(sim.double(), nan=0.0)[tuples[:, a], tuples[:, b]]   # [T, P]
    return torch.sort(pairs, dim=1).values.sum(dim=1) / pairs.shape[1]


@dataclass
class Selection:
    """The chosen experts and why: the full ranking table and every tuple's objective.

    `table` has one row per candidate adapter (bank order); `top` are the M prefiltered names in
    bank order, which is also the order of `similarity` [M, M] and of the columns of `tuples`
    (positions into `top`). tuple_sim / r_d / rank_sum / objective are per tuple [T]."""
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
                "tuples_total": len(self.objective), "tuples": self.ranked_tuples(max_tuples)}

    def format_table(self) -> str:
        """The ranking table as aligned text (what `rocket select` prints)."""
        head = f"{'adapter':<28} {'PPL_R':>12} {'acc':>6} {'R_P':>4} {'R_A':>4} {'sum':>4}  top-M  chosen"
        lines = [head]
        for row in sorted(self.table, key=lambda r: (r["top_m"] is None, r["top_m"] or 0)):
            acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
            ra = "-" if row["R_A"] is None else str(row["R_A"])
            top = "" if row["top_m"] is None else str(row["top_m"])
            lines.append(f"{row['name'][:28]:<28} {row['ppl_sum']:>12.4g} {acc:>6} {row['R_P']:>4} {ra:>4} "
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


def _bank_entries(path: Path) -> list[tuple[str, Path]]:
    """(name, path) of every adapter of a bank directory or manifest, named as LoraBank.load names
    them, without loading any weights (selection needs the weights of the top M only)."""
    if path.is_file() and path.suffix == ".txt":
        entries = _manifest_entries(path)
    elif path.is_dir() and (path / "adapter_config.json").is_file():
        entries = [path]
    elif path.is_dir():
        entries = sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file())
        if not entries:
            raise BankError(f"{path}: no adapter directories (with adapter_config.json) inside")
    else:
        raise BankError(f"{path}: expected a directory of peft adapters or a manifest .txt")
    out, seen = [], {}
    for p in entries:
        name = (p.parent if p.is_file() else p).name
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", p))
    return out


def _weights_path(adapter: LoraAdapter) -> str:
    """The manifest line of an adapter: its weights file (as the seed's manifests list them), or its
    path where it has none (an adapter built in memory)."""
    try:
        return str(_weights_file(adapter.path).resolve())
    except BankError:
        return str(adapter.path)


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
        entries = _bank_entries(Path(bank))
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

    m = min(top_m, len(cand))
    if m < top_m:
        notes.append(f"top_m={top_m} but {len(cand)} adapters are scored: all are kept")
    top_pos = sorted(range(len(cand)), key=lambda k: (int(score[k]), int(r_p[k]), k))[:m]
    top_idx = sorted(top_pos)  # bank order: tuples are enumerated lexicographically in it
    n_tuples = math.comb(m, n_experts)
    if n_tuples > MAX_TUPLES:
        raise SelectionError(f"C({m}, {n_experts}) = {n_tuples} tuples exceed {MAX_TUPLES}: lower top_m")

    top_names = [cand[k] for k in top_idx]
    if isinstance(bank, LoraBank):
        sub = bank.subset([bank.index(n) for n in top_names])
    else:
        paths = dict(entries)
        sub = LoraBank([load_adapter(paths[n], name=n) for n in top_names])
    sim, shared = _similarity(sub, device, progress=progress)
    unshared = _unshared_pairs(top_names, shared)
    if unshared:
        notes.append(f"{len(unshared)} pair(s) of the top M share no module: their similarity counts as 0 "
                     "(ΔW on disjoint modules are orthogonal)")

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
    return Selection(experts, [_weights_path(sub[n]) for n in experts], table, top_names, sim, tuples,
                     tuple_sim, r_d, rank_sum, objective, best, accuracy is not None, unshared, notes)


# --------------------------------------------------------------------------- outputs + CLI
def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    return tmp


def plot_similarity(selection: Selection) -> bytes:
    """PNG of the top-M ΔW similarity matrix, chosen experts starred."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = len(selection.top)
    labels = [("★ " if n in selection.experts else "") + n for n in selection.top]
    fig, ax = plt.subplots(figsize=(min(3 + 0.5 * m, 24), min(2.5 + 0.45 * m, 22)))
    im = ax.imshow(selection.similarity.numpy(), cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(range(m), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(m), labels, fontsize=7)
    if m <= 16:
        for i in range(m):
            for j in range(m):
                v = float(selection.similarity[i, j])
                ax.text(j, i, "–" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title("mean per-module cosine of ΔW (top M; ★ chosen)")
    fig.colorbar(im, ax=ax, label="cos")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(selection: Selection, manifest: Path, report: Path | None, plot: Path | None) -> None:
    """Manifest (one weights path per line, the seed's format), JSON report and PNG; each file is
    written to a temporary name first and all are renamed only when every one is complete."""
    pending = [(_write_atomic(manifest, ("\n".join(selection.paths) + "\n").encode()), manifest)]
    if report is not None:
        pending.append((_write_atomic(report, (json.dumps(selection.to_json(), indent=1) + "\n").encode()), report))
    if plot is not None:
        pending.append((_write_atomic(plot, plot_similarity(selection)), plot))
    for tmp, final in pending:
        tmp.replace(final)


def add_arguments(parser) -> None:
    parser.add_argument("--scores", required=True, help="scores JSON written by `rocket score`")
    parser.add_argument("--bank", required=True, help="directory of peft adapters, or a manifest .txt")
    parser.add_argument("--out", required=True, help="manifest to write: one adapter weights path per line")
    parser.add_argument("--n-experts", type=int, default=4, metavar="N", help="experts to choose (N, default: 4)")
    parser.add_argument("--top-m", type=int, default=8, metavar="M", help="prefilter size M by R_P + R_A (default: 8)")
    parser.add_argument("--accuracy-file", metavar="JSON", help="JSON {adapter: accuracy} overriding the scores' accuracy")
    parser.add_argument("--report", help="JSON report (default: the --out path with .json)")
    parser.add_argument("--plot", help="similarity PNG (default: the --out path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    out = Path(args.out)
    report = Path(args.report) if args.report else out.with_suffix(".json")
    plot = None if args.no_plot else (Path(args.plot) if args.plot else out.with_suffix(".png"))
    if out in (report, plot):
        raise SelectionError(f"--out {out}: the manifest would overwrite the report or the plot")
    scores = Scores.load(args.scores)
    selection = select_experts(scores, Path(args.bank), acc=args.accuracy_file, top_m=args.top_m,
                               n_experts=args.n_experts, device=args.device, progress=not args.no_progress)
    write_outputs(selection, out, report, plot)
    print(selection.format_table())
    for note in selection.notes:
        print(f"note: {note}")
    print(f"chosen ({selection.objective[selection.best]} = Σ(R_P+R_A) {selection.rank_sum[selection.best]} "
          f"+ R_D {selection.r_d[selection.best]}): {', '.join(selection.experts)}; wrote {out}, {report}"
          + (f", {plot}" if plot else ""))
    return 0
