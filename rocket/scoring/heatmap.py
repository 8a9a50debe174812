"""The loss heatmap of stage 1 (adapters × examples)."""
from __future__ import annotations

from pathlib import Path
from rocket.data.scores import Scores
from rocket.io import atomic_path


# --------------------------------------------------------------------------- heatmap + CLI
def save_heatmap(scores: Scores, path: str | Path) -> None:
    """Loss heatmap (adapters × examples) as a PNG, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    N, K = scores.loss.shape
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(min(3 + 0.25 * K, 24), min(1.5 + 0.3 * N, 24)), layout="constrained")
    im = ax.imshow(scores.loss.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(N), scores.names, fontsize=7)
    ax.set_xlabel("example")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # examples are whole numbers
    ax.set_title("loss (nats) per adapter and example")
    fig.colorbar(im, ax=ax, label="loss (nats)")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
