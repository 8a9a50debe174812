"""The outputs of stage 2: experts.txt (the chosen adapters), experts.json, the similarity plot."""
from __future__ import annotations

import json
import math
from io import BytesIO
from pathlib import Path

from rocket.io import atomic_paths
from rocket.selection.ranking import Selection


def plot_similarity(selection: Selection) -> bytes:
    """PNG of the top-M ΔW similarity matrix, chosen experts starred."""

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = len(selection.top)
    labels = [("★ " if n in selection.experts else "") + n for n in selection.top]
    fig, ax = plt.subplots(figsize=(min(4 + 0.5 * m, 24), min(3 + 0.45 * m, 22)), layout="constrained")
    im = ax.imshow(selection.similarity.numpy(), cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(range(m), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(m), labels, fontsize=8)
    if m <= 16:
        for i in range(m):
            for j in range(m):
                v = float(selection.similarity[i, j])
                ax.text(j, i, "–" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("mean per-module cosine of ΔW\n(top M; ★ chosen)", fontsize=10)
    fig.colorbar(im, ax=ax, label="cos")
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(selection: Selection, manifest: Path, report: Path | None, plot: Path | None) -> None:
    """Experts manifest (Selection.manifest: one adapter directory per line), JSON report and PNG,
    written as one group: all of them or none (rocket.io.atomic_paths)."""
    outputs = [(manifest, selection.manifest().encode())]
    if report is not None:
        outputs.append((report, (json.dumps(selection.to_json(), indent=1) + "\n").encode()))
    if plot is not None:
        outputs.append((plot, plot_similarity(selection)))
    with atomic_paths([path for path, _ in outputs]) as temps:
        for tmp, (_, data) in zip(temps, outputs):
            tmp.write_bytes(data)
