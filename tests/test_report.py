"""The run report's figures: readable at any number of layers, full expert names, a smoothed curve."""
import io
import math

import pytest
import torch
from PIL import Image

from rocket.report import plot_curve, plot_routing, smoothed


def test_smoothed_is_the_trailing_mean():
    values = [3.0, 1.0, 2.0, 6.0, 0.0]
    assert smoothed(values, 2) == pytest.approx([3.0, 2.0, 1.5, 4.0, 3.0])
    assert smoothed(values, 1) == values and smoothed([], 3) == []


def test_smoothing_removes_the_sawtooth_of_length_grouped_batches():
    raw = [2.0 + 0.5 * (i % 4) for i in range(80)]
    smooth = smoothed(raw, 8)
    assert max(smooth[8:]) - min(smooth[8:]) < 1e-9 < max(raw) - min(raw)


@pytest.mark.parametrize("layers", [2, 64])
def test_routing_figure_keeps_full_expert_names_and_grows_with_layers(layers):
    g = torch.Generator().manual_seed(layers)
    counts = {f"model.layers.{i}.mlp.down_proj": torch.randint(1, 9, (3, 2), generator=g).tolist() for i in range(layers)}
    experts = ["a_rather_long_expert_name", "b", "c"]
    png = plot_routing({"counts": counts, "experts": experts})
    w, h = Image.open(io.BytesIO(png)).size
    assert w >= 400 and h >= 200 and (layers < 10 or h > 900)   # rows stay tall enough to read


def test_curve_plots_raw_and_smoothed():
    png = plot_curve([{"step": i + 1, "loss": math.exp(-i / 30) + 0.2 * (i % 3)} for i in range(90)])
    assert Image.open(io.BytesIO(png)).size[0] >= 600
    assert Image.open(io.BytesIO(plot_curve([{"step": 1, "loss": 2.0}]))).size[0] >= 600   # one step: a marked point


@pytest.mark.parametrize("meta, words", [
    ({"perplexity": "reasoning", "accuracy": "choice"}, ["reasoning perplexity", "'choice' extractor"]),
    ({"perplexity": "vanilla", "accuracy": None}, ["vanilla perplexity", "the perplexity + diversity ablation"]),
    ({"perplexity": "vanilla", "accuracy": "acc.json"}, ["accuracy given in acc.json"]),
])
def test_the_report_says_which_variant_ran(meta, words):
    from rocket.report import variant
    text = variant(meta)
    assert all(w in text for w in words), text
