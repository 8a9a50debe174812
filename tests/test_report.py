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


def test_the_scores_table_starts_with_the_base_model_and_prints_ppl_r_one_way(tmp_path):
    import json

    from rocket.data.scores import Scores
    from rocket.report import ranking_rows, render_report

    selection = {"experts": ["a"], "objective": 2, "notes": [], "ranking": [
        {"name": "a", "ppl_sum": 4614.3049, "accuracy": 0.5, "R_P": 1, "R_A": 1, "rank_sum": 2, "top_m": 1,
         "chosen": True},
        {"name": "b", "ppl_sum": 24168.0, "accuracy": None, "R_P": 2, "R_A": None, "rank_sum": 2, "top_m": None,
         "chosen": False}]}
    rows = ranking_rows(selection, {"ppl_sum": 30000.126, "accuracy": 0.25})
    assert rows[0] == ["(base model)", "30000.13", "0.250", "-", "-", "-", "", ""]
    assert [r[1] for r in rows[1:]] == ["4614.30", "24168.00"]
    assert ranking_rows(selection)[0][0] == "a"   # no base row known: the adapters alone
    Scores(["a", "b", "zero"], torch.tensor([[2.0, 2.0], [0.5, 0.5], [1.0, 1.0]], dtype=torch.float64),
           meta={"zero_delta": ["zero"]}, base_loss=torch.tensor([1.0, 1.0], dtype=torch.float64)).save(
        tmp_path / "scores.json")
    (tmp_path / "experts.json").write_text(json.dumps(selection))
    page = render_report(tmp_path)
    assert "<tr><td>(base model)</td><td>5.44</td>" in page   # experts.json without 'base': the scores'
    assert "The base model alone: PPL_R 5.44; 1 of 3 adapters are below it." in page
    assert "ΔW = 0 on every module (untrained): zero." in page
    assert "Worse than the base model alone (a higher loss on every example, no better accuracy): a." in page
