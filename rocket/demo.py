"""The embedded default: the whole ROCKET pipeline on a world small enough to build in seconds.

Nothing is downloaded. `rocket demo` builds a tiny Llama and a byte-level BPE tokenizer, teaches the
base model the response format, trains one LoRA adapter per synthetic task family (word-level text
transforms whose answers end with a short rationale), and writes a K-shot set for a *composed*
target task that needs two of those families (reverse the text, then write it in capitals), plus an
open pool that mixes every family and carries planted near-duplicates. It then runs
`rocket run` on that world and checks that the pipeline recovers what was planted:

* the two related adapters have the lowest reasoning perplexity on the K-shot set,
* the augmented data comes mostly from the related families and keeps at most one item of every
  planted duplicate pair,
* the trained mixture of experts has a lower held-out loss than the base model and than the best
  single adapter of the bank.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rocket.io import write_json
from rocket.data.scores import BASE_LABEL, format_ppl
from rocket.data.tokenize import IGNORE_INDEX, tokenize_example, pad_batch
from rocket.data.examples import write_jsonl
from rocket.errors import RocketError
from rocket.progress import progress_bar

TEMPLATE = "chat"
WORDS = ("apple river stone cloud green tiger music paper light ocean chair bread plant sugar glass storm "
         "metal horse field candle winter lemon rocket smile train forest honey piano silver garden table "
         "window summer bottle pencil button carpet dragon engine flower guitar island jacket kettle ladder "
         "marble needle orange pepper rabbit saddle tomato valley wallet yellow zipper basket circle desert "
         "finger hammer insect jungle kitten mirror parrot pocket shadow spider tunnel violin wizard").split()


# --------------------------------------------------------------------------- task families
@dataclass(frozen=True)
class Family:
    """A synthetic task: instruction, a transform of a short phrase, and the rationale it states."""
    name: str
    instruction: str
    reason: str

    def answer(self, text: str) -> str:
        return TRANSFORMS[self.name](text)

    def example(self, text: str) -> dict:
        return {"instruction": self.instruction, "input": text,
                "output": f"{self.answer(text)} because {self.reason}"}


def _caesar(text: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) if "a" <= c <= "z" else c for c in text)


TRANSFORMS = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "caesar": _caesar,
    "sort": lambda s: " ".join(sorted(s.split())),
    "count": lambda s: str(len(s.split())),
    "initials": lambda s: "".join(w[0] for w in s.split()),
    "reverse_upper": lambda s: s[::-1].upper(),
}
FAMILIES = {f.name: f for f in (
    Family("reverse", "Reverse the text.", "it is read from the last letter to the first"),
    Family("upper", "Write the text in capitals.", "every letter becomes a capital"),
    Family("caesar", "Shift every letter by one.", "a becomes b and z wraps to a"),
    Family("sort", "Sort the words.", "the words go in alphabetical order"),
    Family("count", "Count the words.", "there is one number for each word"),
    Family("initials", "Give the first letter of each word.", "only the first letters are kept"),
)}
RELATED = ("reverse", "upper")
# A near-copy of a related adapter (its weights with a little noise): it scores as well as its
# original, so only group diversity (|cos| of ΔW near 1) keeps the two from being chosen together.
NEAR_COPY = ("upper_copy", "upper")
NEAR_COPY_NOISE = 0.02       # relative std of the noise added to every LoRA weight
TARGET = Family("reverse_upper", "Reverse the text and write it in capitals.",
                "it is read from the last letter to the first and every letter becomes a capital")
WARMUP = Family("copy", "Repeat the text.", "the text stays the same")
TRANSFORMS["copy"] = lambda s: s


@dataclass(frozen=True)
class DemoSize:
    """How big the demo world is; `small` is the test size, `full` the default of `rocket demo`."""
    hidden: int
    layers: int
    vocab: int
    warmup_steps: int
    lora_steps: int
    lora_rank: int
    per_family_pool: int
    duplicates: int           # planted near-duplicate pairs in the pool
    kshot: int
    heldout: int
    target: int               # open items kept by data selection (before dedup)
    epochs: int               # MoE training epochs over the augmented data
    batch: int = 16


SIZES = {
    "small": DemoSize(hidden=64, layers=2, vocab=384, warmup_steps=120, lora_steps=80, lora_rank=8,
                      per_family_pool=24, duplicates=12, kshot=8, heldout=24, target=48, epochs=3),
    "full": DemoSize(hidden=64, layers=2, vocab=384, warmup_steps=200, lora_steps=150, lora_rank=8,
                     per_family_pool=48, duplicates=24, kshot=16, heldout=48, target=96, epochs=4),
}


class Phrases:
    """Distinct random phrases of 3–5 words (seeded); never repeats a phrase across the world, so
    K-shot, held-out, bank training and pool items never collide by accident."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seen: set[str] = set()

    def __call__(self) -> str:
        while True:
            p = " ".join(self.rng.sample(WORDS, self.rng.randint(3, 5)))
            if p not in self.seen:
                self.seen.add(p)
                return p


def _near_duplicate(example: dict, rng: random.Random) -> dict:
    """A copy a human would call the same item: trailing punctuation or doubled space changed."""
    dup = dict(example)
    edits = [lambda e: {**e, "output": e["output"] + "."},
             lambda e: {**e, "input": e["input"].replace(" ", "  ", 1)},
             lambda e: {**e, "instruction": e["instruction"].rstrip(".") + "!"}]
    return rng.choice(edits)(dup)


# --------------------------------------------------------------------------- tiny training loop
def _batches(tokenized, batch: int, steps: int, rng: random.Random, pad_id: int):
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            fresh = list(range(len(tokenized)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:batch], order[batch:]
        b = pad_batch([tokenized[i] for i in chosen], pad_id)
        yield b["input_ids"], b["labels"], b["attention_mask"]


def fit(model, tokenized, steps: int, lr: float, batch: int, seed: int, desc: str, progress: bool) -> float:
    """Plain AdamW on the trainable parameters of `model` (cosine decay); returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    loss = float("nan")
    bar = progress_bar(_batches(tokenized, batch, steps, random.Random(seed), model.config.pad_token_id),
               total=steps, desc=desc, disable=not progress, leave=False)
    for ids, labels, mask in bar:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss = out.loss.item()
        bar.set_postfix(loss=f"{loss:.3f}")
    model.eval()
    return loss


# --------------------------------------------------------------------------- the world
def build_world(out: str | Path, size: str | DemoSize = "full", seed: int = 0, progress: bool = True) -> dict:
    """Write base_model/, bank/, kshot.jsonl, pool.jsonl, heldout.jsonl and truth.json under `out`.

    truth.json records what was planted (family of every pool item, the duplicate pairs) so the
    recovered structure can be checked; the pipeline never reads it."""
    from peft import LoraConfig, get_peft_model

    from rocket.tiny import LLAMA_TARGETS, build_llama, build_tokenizer

    cfg = SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    phrase = Phrases(seed)
    rng = random.Random(seed + 1)

    families = list(FAMILIES.values())
    bank_data = {f.name: [f.example(phrase()) for _ in range(4 * cfg.per_family_pool)] for f in families}
    warmup = [WARMUP.example(phrase()) for _ in range(8 * cfg.per_family_pool)]
    kshot = [TARGET.example(phrase()) for _ in range(cfg.kshot)]
    heldout = [TARGET.example(phrase()) for _ in range(cfg.heldout)]

    pool, families_of = [], []
    for f in families:
        for _ in range(cfg.per_family_pool):
            pool.append(f.example(phrase()))
            families_of.append(f.name)
    originals = rng.sample(range(len(pool)), cfg.duplicates)
    pairs = []
    for i in originals:
        pairs.append([i, len(pool)])
        pool.append(_near_duplicate(pool[i], rng))
        families_of.append(families_of[i])
    perm = list(range(len(pool)))
    rng.shuffle(perm)
    where = {old: new for new, old in enumerate(perm)}
    pool = [pool[i] for i in perm]
    families_of = [families_of[i] for i in perm]
    pairs = sorted(sorted([where[a], where[b]]) for a, b in pairs)

    # tokenizer on everything the world will ever show the model (no unknown bytes anyway)
    texts = [f"{e['instruction']} {e['input']} {e['output']}" for rows in bank_data.values() for e in rows]
    texts += [f"{e['instruction']} {e['input']} {e['output']}" for e in warmup + kshot]
    tokenizer = build_tokenizer(texts + ["user: assistant:"], cfg.vocab)
    model = build_llama(tokenizer, hidden=cfg.hidden, layers=cfg.layers, heads=4, kv_heads=2,
                        intermediate=2 * cfg.hidden, max_positions=256, seed=seed)

    def tok(rows):
        return [tokenize_example(e, tokenizer, TEMPLATE) for e in rows]

    # the base model learns the chat format and the alphabet on a task outside the bank
    fit(model, tok(warmup), cfg.warmup_steps, 3e-3, cfg.batch, seed, "base model warm-up", progress)
    base_dir = out / "base_model"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    bank_dir = out / "bank"
    for n, f in enumerate(families):
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=list(LLAMA_TARGETS),
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        torch.manual_seed(seed + 100 + n)
        peft_model = get_peft_model(copy.deepcopy(model), lcfg)
        fit(peft_model, tok(bank_data[f.name]), cfg.lora_steps, 1e-2, cfg.batch, seed + n,
            f"LoRA '{f.name}'", progress)
        peft_model.save_pretrained(str(bank_dir / f.name))
    plant_near_copy(bank_dir / NEAR_COPY[1], bank_dir / NEAR_COPY[0], NEAR_COPY_NOISE, seed)

    write_jsonl(out / "kshot.jsonl", kshot)
    write_jsonl(out / "heldout.jsonl", heldout)
    write_jsonl(out / "pool.jsonl", pool)
    truth = {"related": list(RELATED), "target": TARGET.name, "families": [f.name for f in families],
             "pool_family": families_of, "duplicate_pairs": pairs, "near_copy": list(NEAR_COPY),
             "size": cfg.__dict__, "seed": seed}
    write_json(out / "truth.json", truth)
    return truth


def plant_near_copy(src: Path, dst: Path, noise: float, seed: int) -> None:
    """A copy of the peft adapter `src` whose every LoRA matrix gets Gaussian noise of `noise` × its std."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 999)
    state = load_file(str(src / "adapter_model.safetensors"))
    state = {k: v + noise * v.float().std() * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in state.items()}
    save_file(state, str(dst / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def example_losses(model, tokenized, batch: int = 32) -> torch.Tensor:
    """Mean token cross-entropy (nats) over the output tokens of every example, as in scoring."""
    pad = model.config.pad_token_id or 0
    out = []
    for start in range(0, len(tokenized), batch):
        b = pad_batch(tokenized[start:start + batch], pad)
        ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                               reduction="none")
        n = (target != IGNORE_INDEX).sum(1)
        out.append(ce.sum(1) / n)
    return torch.cat(out).double()


# --------------------------------------------------------------------------- the demo
def _world_ready(world: Path, cfg: DemoSize, seed: int) -> bool:
    try:
        truth = json.loads((world / "truth.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return truth.get("size") == cfg.__dict__ and truth.get("seed") == seed and truth.get("near_copy") == list(NEAR_COPY)


def run_config(world: Path, run_dir: Path, cfg: DemoSize, seed: int, progress: bool, embed_model=None):
    """The `rocket run` options the demo uses (what `rocket run` would be given on the command line).
    The demo's answers are free text, from which no extractor reads a short answer, so it runs
    without accuracy (the perplexity + diversity ablation, docs/design.md 'Accuracy')."""
    from rocket.pipeline.run import RunConfig

    return RunConfig(base_model=str(world / "base_model"), bank=str(world / "bank"), kshot=str(world / "kshot.jsonl"),
                     accuracy=None, pool=str(world / "pool.jsonl"), out=str(run_dir), template=TEMPLATE,
                     n_experts=3, top_m=5, target=cfg.kshot + cfg.target, threshold=0.9, embed_model=embed_model,
                     train=dict(epochs=cfg.epochs, lr=1e-3, batch_size=cfg.batch, grad_accum=1,
                                lora_dropout=0.0, top_k=2, backend="torch"),
                     device="cpu", seed=seed, progress=progress)


def evaluate(world: Path, run_dir: Path, truth: dict) -> dict:
    """What the pipeline recovered, against what build_world planted."""
    from rocket.adapters.bank import LoraBank
    from rocket.data.examples import load_examples
    from rocket.modeling import load_base
    from rocket.data.scores import Scores
    from rocket.scoring.score import score_adapters
    from rocket.moe.state import load_moe

    related = set(truth["related"])
    scores = Scores.load(run_dir / "scores.json")
    order = torch.argsort(scores.ppl_sum, stable=True).tolist()
    ranking = [scores.names[i] for i in order]
    experts = json.loads((run_dir / "experts.json").read_text())["experts"]

    aug = json.loads((run_dir / "aug.json").read_text())
    selected = aug["selected"]
    fams = [truth["pool_family"][j] for j in selected]
    chosen = set(selected)
    pairs = truth["duplicate_pairs"]
    touched = [p for p in pairs if p[0] in chosen or p[1] in chosen]
    both = [p for p in pairs if p[0] in chosen and p[1] in chosen]

    model, tokenizer = load_base(world / "base_model", torch.device("cpu"))
    heldout = load_examples(world / "heldout.jsonl")
    tokenized = [tokenize_example(e, tokenizer, TEMPLATE) for e in heldout]
    base_loss = float(example_losses(model, tokenized).mean())
    bank = LoraBank.load(world / "bank")
    single = score_adapters(model, tokenizer, bank, tokenized, TEMPLATE, accuracy=None, progress=False,
                            log=lambda *a: None)
    adapter_loss = dict(zip(single.names, single.loss.mean(1).tolist()))
    moe = load_moe(copy.deepcopy(model), run_dir / "checkpoint").eval()
    moe_loss = float(example_losses(moe, tokenized).mean())
    best_name = min(adapter_loss, key=adapter_loss.get)
    similarity = bank.subset([bank.index(n) for n in truth["near_copy"]]).delta_cos()
    return {
        "ranking": ranking, "ppl_sum": {n: float(scores.ppl_sum[i]) for i, n in enumerate(scores.names)},
        "base_ppl_sum": scores.base_ppl_sum,
        "experts": experts, "near_copy_cos": float(similarity[0, 1]),
        "open_selected": len(selected), "open_pool": aug["counts"]["pool"],
        "selected_by_family": {f: fams.count(f) for f in truth["families"]},
        "related_fraction": sum(f in related for f in fams) / max(1, len(fams)),
        "pool_related_fraction": sum(f in related for f in truth["pool_family"]) / len(truth["pool_family"]),
        "duplicates_removed": aug["counts"]["duplicates_removed"],
        "planted_pairs": len(pairs), "planted_pairs_retrieved": len(touched), "planted_pairs_both_kept": len(both),
        "heldout_examples": len(heldout), "heldout_loss": {"base model": base_loss, **{f"adapter {n}": v for n, v in
                                                                                      adapter_loss.items()},
                                                        "rocket MoE": moe_loss},
        "base_loss": base_loss, "best_adapter": best_name, "best_adapter_loss": adapter_loss[best_name],
        "moe_loss": moe_loss,
    }


def checks(result: dict, truth: dict) -> dict[str, bool]:
    """The structure the demo must recover ."""
    related = set(truth["related"])
    copy_name, original = truth["near_copy"]
    covered = {original if e == copy_name else e for e in result["experts"]}
    return {
        "the related adapters (and the near-copy) rank first by PPL_R":
            set(result["ranking"][:3]) == related | {copy_name},
        "the chosen experts cover both related tasks": related <= covered,
        "diversity rejects the near-copy: it is never chosen beside its original":
            not {copy_name, original} <= set(result["experts"]),
        "augmented data is mostly from the related families (≥ 80%)": result["related_fraction"] >= 0.8,
        "no planted near-duplicate pair survives": result["planted_pairs_both_kept"] == 0
                                                    and result["planted_pairs_retrieved"] > 0,
        "MoE held-out loss < base model": result["moe_loss"] < result["base_loss"],
        "MoE held-out loss < best single adapter": result["moe_loss"] < result["best_adapter_loss"],
    }


def summary_lines(result: dict, truth: dict, ok: dict[str, bool], seconds: float) -> list[str]:
    related = set(truth["related"])
    lines = [f"target task: '{TARGET.instruction}' (K={truth['size']['kshot']}), needs {' + '.join(truth['related'])}",
             "", "stage 1 · PPL_R ranking (lower is better):"]
    if result.get("base_ppl_sum") is not None:
        lines.append(f"     {BASE_LABEL:<12}{format_ppl(result['base_ppl_sum']):>10}   (no adapter, for reference)")
    for k, name in enumerate(result["ranking"], 1):
        mark = "   ← related" if name in related else "   ← near-copy" if name == truth["near_copy"][0] else ""
        lines.append(f"  {k}. {name:<11} {format_ppl(result['ppl_sum'][name]):>10}{mark}")
    lines += ["", f"stage 2 · chosen experts: {', '.join(result['experts'])} (3 of the top 5; the near-copy "
              f"'{truth['near_copy'][0]}' has ΔW |cos| {result['near_copy_cos']:.2f} with its original)", "",
              f"stage 3 · {result['open_selected']} of {result['open_pool']} open items kept; by family: "
              + ", ".join(f"{f} {n}" for f, n in result["selected_by_family"].items() if n),
              f"          related share {result['related_fraction']:.0%} (pool: {result['pool_related_fraction']:.0%}); "
              f"{result['duplicates_removed']} near-duplicates removed; planted pairs retrieved "
              f"{result['planted_pairs_retrieved']}/{result['planted_pairs']}, both kept {result['planted_pairs_both_kept']}",
              "", f"stage 4 · held-out loss on {result['heldout_examples']} target examples (nats/token):"]
    for name, v in sorted(result["heldout_loss"].items(), key=lambda kv: kv[1]):
        lines.append(f"  {name:<20} {v:6.3f}")
    lines.append("")
    for text, passed in ok.items():
        lines.append(f"  [{'ok' if passed else 'FAIL'}] {text}")
    lines.append(f"\n{'recovered' if all(ok.values()) else 'NOT recovered'}: the planted structure, in {seconds:.0f}s")
    return lines


def _html_section(lines: list[str]) -> str:
    import html
    return f"<pre>{html.escape(chr(10).join(lines))}</pre>"


def idle_cores(sample: float = 0.25) -> int:
    """How many of this process's cores are idle right now (Linux: /proc/stat over `sample` s; else
    all of them). The demo's models are tiny: a torch thread on a core another process holds only
    spins and waits, so the demo runs on the idle cores alone."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))

    def ticks():
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *vals = line.split()
                    vals = [int(v) for v in vals]
                    out[int(name[3:])] = (vals[3] + vals[4], sum(vals))   # idle + iowait, total
        return out
    try:
        a = ticks()
        time.sleep(sample)
        b = ticks()
    except OSError:
        return len(cores)
    idle = sum(1 for c in cores if c in a and c in b and b[c][1] > a[c][1]
               and (b[c][0] - a[c][0]) / (b[c][1] - a[c][1]) > 0.5)
    return max(1, idle)


def run_demo(out: str | Path = "rocket-demo", size: str = "full", seed: int = 0, progress: bool = True,
             embed_model: str | None = None, log=print) -> dict:
    """Build the world (or reuse it), run the pipeline on it, evaluate, print the summary.
    Returns {'result', 'checks', 'seconds', 'run_dir'}; writes demo.json and report.html in out/run."""
    if size not in SIZES:
        raise RocketError(f"demo: unknown size {size!r}: use {', '.join(SIZES)}")
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    threads = min(threads_before, idle_cores())
    torch.set_num_threads(threads)
    log(f"[demo] {threads} thread(s): the cores idle now")
    try:
        return _run_demo(out, size, seed, progress, embed_model, log, start)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(out, size, seed, progress, embed_model, log, start) -> dict:
    from rocket.pipeline.run import run_pipeline
    from rocket.report import write_report

    cfg = SIZES[size]
    out = Path(out)
    world, run_dir = out / "world", out / "run"
    if _world_ready(world, cfg, seed):
        log(f"[world] reusing {world}")
    else:
        log(f"[world] building the tiny model, tokenizer, LoRA bank and data in {world}")
        t = time.perf_counter()
        build_world(world, cfg, seed, progress)
        log(f"[world] built in {time.perf_counter() - t:.1f}s")
    truth = json.loads((world / "truth.json").read_text())
    run_pipeline(run_config(world, run_dir, cfg, seed, progress, embed_model), log=log)
    t = time.perf_counter()
    result = evaluate(world, run_dir, truth)
    log(f"[evaluate] held-out losses in {time.perf_counter() - t:.1f}s")
    ok = checks(result, truth)
    seconds = time.perf_counter() - start
    lines = summary_lines(result, truth, ok, seconds)
    log("\n".join(lines))
    write_json(run_dir / "demo.json", {"result": result, "checks": ok, "seconds": seconds})
    write_report(run_dir, run_dir / "report.html", [("rocket demo: what was planted and what came back",
                                                      _html_section(lines))])
    return {"result": result, "checks": ok, "seconds": seconds, "run_dir": run_dir}


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--out", default="rocket-demo", help="directory for the world and the run (default: rocket-demo)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full (default, ≈30 s on 2 idle CPU cores) or small (the test size)")
    parser.add_argument("--embed-model", help="encoder for data selection (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    if args.device.type != "cpu":
        print(f"rocket demo: the demo world is tiny and runs on the CPU (ignoring --device {args.device})")
    done = run_demo(args.out, args.size, args.seed, not args.no_progress, args.embed_model)
    print(f"report: {done['run_dir'] / 'report.html'}")
    return 0 if all(done["checks"].values()) else 1
