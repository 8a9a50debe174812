"""report.html of a run directory: one self-contained page (PNG plots embedded as base64).

Sections: the loss heatmap of stage 1, the ranking table and ΔW similarity matrix of stage 2, the
data-selection counts of stage 3, and for stage 4 the training curve and a routing histogram per
layer (the share of tokens each expert receives in the top-k of every MoE layer, measured on the
K-shot examples by `routing_stats`).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import torch

from rocket.errors import RocketError
from rocket.data.scores import BASE_LABEL, Scores, format_ppl
from rocket.data.tokenize import pad_batch
from rocket.io import atomic_write


# --------------------------------------------------------------------------- routing statistics
@torch.no_grad()
def routing_counts(model, tokenized, batch: int = 16) -> dict[str, list[list[int]]]:
    """Per MoE layer and expert: how many tokens choose it at each top-k slot ([E][k] counts), over
    the real (unpadded) tokens of `tokenized`. Uses each layer's router exactly as its forward does
    (softmax in float32, top-k)."""
    from rocket.moe.inject import moe_layers

    layers = moe_layers(model)
    if not layers:
        raise RocketError("routing statistics: the model has no LoRA-MoE layers")
    counts = {name: torch.zeros(layer.n_experts, layer.top_k, dtype=torch.long) for name, layer in layers.items()}
    mask_box = {}

    def hook(name, layer):
        def fn(_module, args):
            x = args[0].reshape(-1, layer.in_features)[mask_box["mask"]]
            probs = torch.softmax(x.float() @ layer.router.weight.float().t(), dim=-1)
            top = probs.topk(layer.top_k, dim=-1).indices.cpu()
            for slot in range(layer.top_k):
                counts[name][:, slot] += torch.bincount(top[:, slot], minlength=layer.n_experts)
        return fn

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", 0) or 0
    try:
        for start in range(0, len(tokenized), batch):
            b = pad_batch(tokenized[start:start + batch], pad)
            ids, mask = b["input_ids"], b["attention_mask"]
            mask_box["mask"] = mask.reshape(-1).bool().to(device)
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: c.tolist() for name, c in counts.items()}


def routing_stats(pipeline) -> dict:
    """Routing counts of the trained MoE of a run on its K-shot examples (see routing_counts)."""
    import copy

    from rocket.data.examples import load_examples
    from rocket.data.tokenize import tokenize_examples
    from rocket.moe.state import moe_config
    from rocket.moe.state import load_moe

    c = pipeline.cfg
    base, tokenizer = pipeline.base()
    model = load_moe(copy.deepcopy(base), pipeline.p("checkpoint")).eval()
    limit = getattr(model.config, "max_position_embeddings", None)
    tokenized = [t for t in tokenize_examples(load_examples(c.kshot), tokenizer, c.template, limit, "truncate")
                 if t is not None]
    counts = routing_counts(model, tokenized)
    return {"experts": moe_config(model).get("experts"), "top_k": moe_config(model)["top_k"],
            "tokens": sum(len(t.input_ids) for t in tokenized), "counts": counts}


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def plot_routing(routing: dict) -> bytes:
    """Share of routed tokens per expert (columns, full names) and MoE layer (rows), all top-k slots
    together: one readable heatmap however many layers the model has."""
    plt = _plt()
    names = list(routing["counts"])
    counts = torch.tensor([routing["counts"][n] for n in names], dtype=torch.float64).sum(dim=2)   # [L, E]
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    experts = routing.get("experts") or [f"expert {e}" for e in range(share.shape[1])]
    labels = [n.replace("model.layers.", "L").replace(".self_attn", "").replace(".mlp", "") for n in names]
    fig, ax = plt.subplots(figsize=(3 + 0.9 * len(experts), 1.6 + 0.22 * len(names)), layout="constrained")
    im = ax.imshow(share.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=max(float(share.max()), 1e-9),
                   interpolation="nearest")
    ax.set_xticks(range(len(experts)), experts, rotation=30, ha="right", fontsize=9)
    step = max(1, len(names) // 40)  # at most ~40 row labels
    ax.set_yticks(range(0, len(names), step), labels[::step], fontsize=8)
    ax.set_title("share of routed tokens per expert\nand MoE layer (K-shot examples)", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of tokens")
    return _png(fig)


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the mean of the last `window` values seen so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curve(history: list[dict]) -> bytes:
    """Training loss per step, raw (length-grouped batches make it jagged) and smoothed; the
    evaluation loss where logged."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
    pts = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    steps, losses = [p[0] for p in pts], [p[1] for p in pts]
    window = max(1, len(losses) // 10)
    if window == 1:   # too few steps to smooth: the steps themselves, marked (one step is a lone point)
        ax.plot(steps, losses, "o-", color="C0", linewidth=1.5, label="train loss (per step)")
    else:
        ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=0.8, label="train loss (per step)")
        ax.plot(steps, smoothed(losses, window), color="C0", linewidth=2, label=f"train loss (mean of {window})")
    ev = [(h["step"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    if ev:
        ax.plot([p[0] for p in ev], [p[1] for p in ev], "o-", color="C1", label="eval loss")
    ax.set_xlabel("step")
    if window == 1:   # steps are whole numbers: a tick at each, not 0.96, 0.98, … around a lone step
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (nats)")
    ax.set_title("training curve")
    ax.legend(fontsize=8)
    return _png(fig)


def training_history(checkpoint: Path) -> list[dict]:
    """The loss per optimizer step of a `rocket train` output directory (losses.json) as
    [{step, loss}]; empty when there is none."""
    path = checkpoint / "losses.json"
    if not path.is_file():
        return []
    losses = json.loads(path.read_text())
    return [{"step": i + 1, "loss": float(v)} for i, v in enumerate(losses)]


# --------------------------------------------------------------------------- HTML
def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(head: list[str], rows: list[list], mark=None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="mark"' if mark and mark(i) else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    return "\n".join(out) + "</table>"


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def ranking_rows(selection: dict, base: dict | None = None) -> list[list]:
    """The scores table: the base model's row first when `base` (scores.json's 'base') is given,
    unranked, then the adapters by R_P + R_A."""
    rows = sorted(selection["ranking"], key=lambda r: (r["R_P"] + (r["R_A"] or 0), r["R_P"], r["name"]))
    head = [] if base is None else [[BASE_LABEL, format_ppl(base["ppl_sum"]),
                                     "-" if base.get("accuracy") is None else f"{base['accuracy']:.3f}",
                                     "-", "-", "-", "", ""]]
    return head + [[r["name"], format_ppl(r["ppl_sum"]), "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                    r["R_P"], "-" if r["R_A"] is None else r["R_A"], r["rank_sum"], r["top_m"] or "",
                    "★" if r["chosen"] else ""] for r in rows]


def scoring_notes(scores: Scores) -> list[str]:
    """The adapters that cannot help, as scoring warned about them: ΔW = 0 and worse than the base model."""
    zero, worse = scores.unhelpful()
    notes = []
    if zero:
        notes.append(f"ΔW = 0 on every module (untrained): {', '.join(zero)}.")
    if worse:
        notes.append("Worse than the base model alone (a higher loss on every example, no better accuracy): "
                     + ", ".join(worse) + ".")
    return notes


# Long paths and names (the run directory, adapters, the embedder) wrap instead of widening the page;
# tests/test_report_browser.py checks the page in a headless browser.
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}tr.mark td{background:#fff4c2}img{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:0 3px}h2{border-bottom:1px solid #ddd}
code,td{overflow-wrap:anywhere}pre{white-space:pre-wrap;overflow-wrap:anywhere}"""


def variant(meta: dict) -> str:
    """Which variant of ROCKET's scoring ran, in words (the paper's, or which ablation)."""
    perplexity = ("reasoning perplexity (K-shot items with rationales)" if meta.get("perplexity") == "reasoning"
                  else "vanilla perplexity (no rationale set given)")
    accuracy = meta.get("accuracy")
    if accuracy is None:
        ranks = "accuracy off (the perplexity + diversity ablation)"
    elif accuracy in ("choice", "number", "exact"):
        ranks = f"exact-match accuracy with the '{accuracy}' extractor"
    else:
        ranks = f"the accuracy given in {accuracy}"
    return f"Ranked by {perplexity} and {ranks}."


def render_report(run_dir: str | Path, extra_sections: list[tuple[str, str]] | None = None) -> str:
    """The HTML of report.html for a run directory (sections for the stages that have outputs)."""
    run = Path(run_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>rocket run {html.escape(run.name)}</title>"
             f"<style>{CSS}</style></head><body><h1>rocket run <code>{html.escape(str(run))}</code></h1>"]
    for title, body in extra_sections or []:
        parts.append(f"<h2>{html.escape(title)}</h2>{body}")

    scores = _load(run / "scores.json")
    if scores:
        meta = scores.get("meta", {})
        parts.append(f"<h2>1 · Scoring</h2><p>{len(scores['adapters'])} adapters × {scores['examples']} K-shot "
                     f"examples, template <code>{html.escape(str(meta.get('template')))}</code>, "
                     f"{meta.get('seconds', 0):.2f} s. {html.escape(variant(meta))}</p>")
        parsed = Scores.from_json(scores, run / "scores.json")  # the file is read once
        if parsed.base_loss is not None:
            parts.append(f"<p>The base model alone: PPL_R {format_ppl(parsed.base_ppl_sum)}; {parsed.below_base()} of "
                         f"{len(parsed.names)} adapters are below it.</p>")
        notes = scoring_notes(parsed)
        if notes:
            parts.append("<p>" + " ".join(html.escape(n) for n in notes) + "</p>")
        if (run / "heatmap.png").is_file():
            parts.append(_img((run / "heatmap.png").read_bytes(), "loss heatmap"))

    selection = _load(run / "experts.json")
    if selection:
        parts.append("<h2>2 · Expert selection</h2>")
        parts.append(f"<p>Chosen: <b>{html.escape(', '.join(selection['experts']))}</b> "
                     f"(objective {selection['objective']}). " + " ".join(html.escape(n) for n in selection["notes"])
                     + "</p>")
        rows = ranking_rows(selection, selection.get("base", (scores or {}).get("base")))
        parts.append(_table(["adapter", "PPL_R", "acc", "R_P", "R_A", "R_P+R_A", "top-M", "chosen"],
                            rows, mark=lambda i: rows[i][-1] == "★"))
        tuples = selection.get("tuples", [])[:10]
        if tuples:
            parts.append("<p>Best tuples (objective = Σ(R_P+R_A) + R_D):</p>" + _table(
                ["adapters", "Σ ranks", "similarity", "R_D", "objective"],
                [[", ".join(t["adapters"]), t["rank_sum"], f"{t['similarity']:.3f}", t["R_D"], t["objective"]]
                 for t in tuples], mark=lambda i: i == 0))
        if (run / "similarity.png").is_file():
            parts.append(_img((run / "similarity.png").read_bytes(), "similarity matrix"))

    aug = _load(run / "aug.json")
    if aug:
        c = aug["counts"]
        parts.append("<h2>3 · Data selection</h2>" + _table(
            ["pool", "candidates", "K-shot copies removed", "near-duplicates removed", "kept", "K-shot", "output",
             "threshold", "embedder"],
            [[c["pool"], c["candidates"], c.get("kshot_copies_removed", 0), c["duplicates_removed"], c["kept"],
              c["kshot"], c["output"],
              aug["threshold"], aug.get("embedder", "")]]))

    ckpt = run / "checkpoint"
    if ckpt.is_dir():
        parts.append("<h2>4 · Mixture of experts</h2>")
        history = training_history(ckpt)
        if history:
            parts.append(_img(plot_curve(history), "training curve"))
        routing = _load(run / "routing.json")
        if routing:
            parts.append(f"<p>Routing of {routing['tokens']} K-shot tokens, top-{routing['top_k']}:</p>")
            parts.append(_img(plot_routing(routing), "routing histogram per layer"))
    evaluation = _load(run / "eval.json")
    if evaluation:
        extractor = evaluation.get("extractor")
        rows = sorted(evaluation["rows"], key=lambda r: r["loss"])
        parts.append(f"<h2>5 · Held-out evaluation</h2><p>{evaluation['meta']['examples']} examples; accuracy: "
                     + ("off" if extractor is None else f"extractor '{html.escape(extractor['name'])}'") + "</p>")
        parts.append(_table(["row", "loss (nats/token)", "accuracy"],
                            [[r["name"], f"{r['loss']:.4f}", "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"]
                             for r in rows], mark=lambda i: rows[i]["kind"] == "moe"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, out: str | Path, extra_sections=None) -> Path:
    """Write report.html atomically."""
    return atomic_write(out, render_report(run_dir, extra_sections))
