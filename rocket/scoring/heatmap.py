"""The loss heatmap of stage 1 (adapters × examples), the base model alone as its first row."""
from __future__ import annotations

from pathlib import Path
import torch
from rocket.data.scores import BASE_LABEL, Scores
from rocket.io import atomic_path


def heatmap_rows(scores: Scores) -> tuple[list[str], torch.Tensor]:
    """(row labels, loss [rows, K]) of the heatmap: the base model's row first when it was scored,
    then the adapters in the scores' order."""
    if scores.base_loss is None:
        return list(scores.names), scores.loss
    return [BASE_LABEL, *scores.names], torch.cat([scores.base_loss[None], scores.loss])


# --------------------------------------------------------------------------- heatmap + CLI
def save_heatmap(scores: Scores, path: str | Path) -> None:
    """Loss heatmap (adapters × examples) as a PNG, written atomically; the base model's row, when
    scored, comes first, its label in bold and a white rule below it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    labels, loss = heatmap_rows(scores)
    N, K = loss.shape
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(min(3 + 0.25 * K, 24), min(1.5 + 0.3 * N, 24)), layout="constrained")
    im = ax.imshow(loss.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(N), labels, fontsize=7)
    if scores.base_loss is not None:
        ax.get_yticklabels()[0].set_fontweight("bold")
        ax.axhline(0.5, color="white", linewidth=3)   # the base row apart from the adapters'
    ax.set_xlabel("example")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # examples are whole numbers
    ax.set_title("loss (nats) per adapter and example" + (", base model first" if scores.base_loss is not None
                                                           else ""))
    fig.colorbar(im, ax=ax, label="loss (nats)")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
