"""`rocket run`: score → select → augment → train → report in one run directory, resumable.

Every stage writes its outputs atomically and then a stamp (`RUN_DIR/.rocket/<stage>.json`) with
the configuration it ran with, fingerprints of its input files and the stamps of the stages it
builds on. A stage is skipped when its stamp matches and all its outputs exist; any change of its
options, of an input file or of an upstream result runs it (and so everything after it) again.
A run killed mid-way therefore resumes at the first stage that had not finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rocket.errors import RocketError

STAGES = ("score", "select", "augment", "train", "report")
STAMP_DIR = ".rocket"


class PipelineError(RocketError):
    """A run directory or run option that cannot be used."""


@dataclass
class RunConfig:
    """Everything `rocket run` needs; the stage options mirror the stage commands' flags."""
    base_model: str
    bank: str
    kshot: str
    opensource: str
    out: str
    # score
    template: str = "alpaca"
    accuracy: str | None = None            # extractor: choice, number, exact
    accuracy_file: str | None = None
    max_new_tokens: int = 64
    max_tokens: int | None = None
    dtype: str = "auto"
    # select
    n_experts: int = 4
    top_m: int = 8
    # augment
    target: int = 1000
    threshold: float = 0.9
    embed_model: str | None = None
    prefix: str | None = None
    embed_batch_size: int = 64
    # train (passed to rocket.train.train as keyword arguments)
    train: dict = field(default_factory=dict)
    # everywhere
    device: str | None = None
    seed: int = 0
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        return Path(self.out)


# --------------------------------------------------------------------------- stamps
def _fingerprint(path: str | Path) -> list:
    """Cheap identity of an input file or directory: relative name, size and mtime of every file."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if path.is_dir():
        out = []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
        return out
    raise PipelineError(f"{path}: no such file or directory")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> None:
    """JSON written to a temporary name and renamed: the file appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class Stamps:
    """The stamps of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / STAMP_DIR

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def read(self, stage: str) -> dict | None:
        try:
            return json.loads(self.path(stage).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def clear(self, stage: str) -> None:
        self.path(stage).unlink(missing_ok=True)

    def write(self, stage: str, key: str, outputs: list[str], seconds: float, summary: dict) -> None:
        write_json(self.path(stage), {"stage": stage, "key": key, "outputs": outputs, "seconds": seconds,
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      "summary": summary})


# --------------------------------------------------------------------------- stages
def _dtype(name: str, device: torch.device) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        name, torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_base(path: str | Path, device: torch.device, dtype: str = "auto"):
    """(model, tokenizer) of an HF causal-LM directory, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path}: no such model directory")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa")
    return model.to(device=device, dtype=_dtype(dtype, device)).eval(), tokenizer


class Pipeline:
    """One run directory; `run()` executes the stages that are not already done."""

    def __init__(self, cfg: RunConfig, log=print):
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.device = torch.device(cfg.device) if cfg.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.stamps = Stamps(self.dir)
        self.log = log
        self._base = None
        self._bank = None
        self.status: dict[str, str] = {}

    # ---- shared inputs, loaded once and only when a stage needs them
    def base(self):
        if self._base is None:
            self._base = load_base(self.cfg.base_model, self.device, self.cfg.dtype)
        return self._base

    def bank(self):
        if self._bank is None:
            from rocket.bank import LoraBank
            self._bank = LoraBank.load(self.cfg.bank, progress=self.cfg.progress)
        return self._bank

    def p(self, name: str) -> Path:
        return self.dir / name

    # ---- stage table: name → (outputs, inputs, options, function)
    def _plan(self):
        c = self.cfg
        return {
            "score": (["scores.json", "heatmap.png"], [c.base_model, c.bank, c.kshot] +
                      ([c.accuracy_file] if c.accuracy_file else []),
                      dict(template=c.template, accuracy=c.accuracy, max_new_tokens=c.max_new_tokens,
                           dtype=c.dtype, device=self.device.type), self._score),
            "select": (["experts.txt", "experts.json", "similarity.png"], [c.bank],
                       dict(n_experts=c.n_experts, top_m=c.top_m), self._select),
            "augment": (["aug.jsonl", "aug.json"], [c.kshot, c.opensource],
                        dict(target=c.target, threshold=c.threshold, embed_model=c.embed_model, prefix=c.prefix,
                             seed=c.seed), self._augment),
            "train": (["checkpoint"], [c.base_model], dict(train=c.train, seed=c.seed, device=self.device.type),
                      self._train),
            "report": (["routing.json", "report.html"], [], {}, self._report),
        }

    def run(self, force: str | None = None, stop_after: str | None = None) -> dict:
        """Run every stage not already done (from `force` on, all are redone); stop after
        `stop_after`. Returns {stage: 'ran' | 'skipped'} (and the stages not reached are absent)."""
        for name, value in (("force", force), ("stop_after", stop_after)):
            if value is not None and value not in STAGES:
                raise PipelineError(f"--{name.replace('_', '-')} {value}: not a stage ({', '.join(STAGES)})")
        self.dir.mkdir(parents=True, exist_ok=True)
        plan = self._plan()
        upstream = []
        redo = False
        for stage in STAGES:
            outputs, inputs, options, fn = plan[stage]
            redo = redo or stage == force
            key = _digest({"options": options, "inputs": [_fingerprint(p) for p in inputs], "upstream": upstream})
            stamp = self.stamps.read(stage)
            done = (not redo and stamp is not None and stamp.get("key") == key
                    and all(self.p(o).exists() for o in outputs))
            if done:
                self.status[stage] = "skipped"
                self.log(f"[{stage}] done before (outputs in {self.dir}), skipped")
            else:
                self.stamps.clear(stage)
                self.log(f"[{stage}] running")
                start = time.perf_counter()
                summary = fn() or {}
                seconds = time.perf_counter() - start
                self.stamps.write(stage, key, outputs, seconds, summary)
                self.status[stage] = "ran"
                self.log(f"[{stage}] finished in {seconds:.1f}s")
                redo = True  # everything downstream depends on what was just (re)made
            upstream.append(key)
            if stage == stop_after:
                break
        return dict(self.status)

    # ---- the stages
    def _score(self) -> dict:
        from rocket.data import load_examples
        from rocket.scoring import save_heatmap, score_adapters

        c = self.cfg
        examples = load_examples(c.kshot)
        model, tokenizer = self.base()
        scores = score_adapters(model, tokenizer, self.bank(), examples, c.template, accuracy=c.accuracy,
                                accuracy_file=c.accuracy_file, max_new_tokens=c.max_new_tokens,
                                max_tokens=c.max_tokens, progress=c.progress)
        scores.meta.update(base_model=str(c.base_model), bank=str(c.bank), data=str(c.kshot))
        save_heatmap(scores, self.p("heatmap.png"))
        scores.save(self.p("scores.json"))
        best = int(torch.argmin(scores.ppl_sum))
        return {"adapters": len(scores.names), "examples": scores.loss.shape[1], "lowest_ppl_r": scores.names[best]}

    def _select(self) -> dict:
        from rocket.scoring import Scores
        from rocket.selection import select_experts, write_outputs

        c = self.cfg
        scores = Scores.load(self.p("scores.json"))
        selection = select_experts(scores, self.bank(), top_m=c.top_m, n_experts=c.n_experts,
                                   device=self.device, progress=c.progress)
        write_outputs(selection, self.p("experts.txt"), self.p("experts.json"), self.p("similarity.png"))
        self.log(selection.format_table())
        for note in selection.notes:
            self.log(f"note: {note}")
        return {"experts": selection.experts}

    def _augment(self) -> dict:
        from rocket.augment import select_data
        from rocket.data import load_examples, write_jsonl

        c = self.cfg
        kshot, pool = load_examples(c.kshot), load_examples(c.opensource)
        examples, report = select_data(kshot, pool, c.target, c.threshold, embedder=c.embed_model,
                                       prefix=c.prefix, batch_size=c.embed_batch_size, device=self.device,
                                       seed=c.seed, progress=c.progress)
        report.update(opensource=str(c.opensource), kshot_path=str(c.kshot))
        write_json(self.p("aug.json"), report)
        write_jsonl(self.p("aug.jsonl"), examples)
        return dict(report["counts"])

    def _train(self) -> dict:
        from rocket.train import train

        c = self.cfg
        final, partial = self.p("checkpoint"), self.p("checkpoint.partial")
        # Training runs in checkpoint.partial/ and is renamed to checkpoint/ only when it has finished,
        # so checkpoint/ always means complete. A killed run resumes from the last epoch checkpoint
        # inside checkpoint.partial/ when the options are the same (else it starts over).
        options = dict(c.train)
        deepspeed = options.pop("deepspeed", None)
        backend = options.pop("backend", "auto")
        options.setdefault("template", c.template)
        options.setdefault("seed", c.seed)
        key = _digest({"options": options, "deepspeed": deepspeed, "backend": backend,
                       "data": _fingerprint(self.p("aug.jsonl")), "experts": _fingerprint(self.p("experts.txt"))})
        marker = partial / ".rocket_key"
        resume = partial.is_dir() and marker.is_file() and marker.read_text() == key
        if not resume:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            marker.write_text(key)
        else:
            self.log(f"[train] resuming from the checkpoints in {partial}")
        result = train(c.base_model, str(self.p("aug.jsonl")), str(self.p("experts.txt")), partial,
                       deepspeed_config=deepspeed, backend=backend, device=self.device, resume=resume,
                       progress=c.progress, **options)
        marker.unlink()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        losses = result.losses
        return {"steps": result.steps, "backend": result.backend, "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "seconds": result.seconds}

    def _report(self) -> dict:
        from rocket.report import routing_stats, write_report

        write_json(self.p("routing.json"), routing_stats(self))
        write_report(self.dir, self.p("report.html"))
        return {}


def run_pipeline(cfg: RunConfig, force: str | None = None, stop_after: str | None = None, log=print) -> dict:
    """Run (or resume) the whole pipeline; see Pipeline.run."""
    return Pipeline(cfg, log).run(force, stop_after)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--base-model", required=True, help="HF model directory of the base model")
    parser.add_argument("--bank", required=True, help="directory of peft adapters, or a manifest .txt")
    parser.add_argument("--kshot", required=True, help="K-shot examples of the task (JSONL or JSON array)")
    parser.add_argument("--opensource", required=True, help="open instruction data to select from")
    parser.add_argument("--out", required=True, help="run directory (created; an existing one is resumed)")
    g = parser.add_argument_group("score")
    g.add_argument("--template", default="alpaca", help="prompt template: alpaca, llama2, mistral, chat "
                   "or a .json file (default: alpaca)")
    acc = g.add_mutually_exclusive_group()
    acc.add_argument("--accuracy", nargs="?", const="exact", choices=["choice", "number", "exact"],
                     help="also rank by exact-match accuracy of greedy generations with this extractor")
    acc.add_argument("--accuracy-file", help="JSON {adapter: accuracy} to use as accuracy")
    g.add_argument("--max-new-tokens", type=int, default=64, help="generation length for --accuracy")
    g.add_argument("--max-tokens", type=int, default=None, help="padded tokens per scoring forward")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype for scoring (auto: bfloat16 on CUDA, float32 on CPU)")
    g = parser.add_argument_group("select")
    g.add_argument("--n-experts", type=int, default=4, help="experts to choose (default: 4)")
    g.add_argument("--top-m", type=int, default=8, help="prefilter size M by R_P + R_A (default: 8)")
    g = parser.add_argument_group("augment")
    g.add_argument("--target", type=int, default=1000, help="augmented size before dedup (default: 1000)")
    g.add_argument("--threshold", type=float, default=0.9, help="near-duplicate cosine (default: 0.9)")
    g.add_argument("--embed-model", help="local encoder directory (default: bundled all-MiniLM-L6-v2)")
    g.add_argument("--prefix", help="text prepended to every item before embedding")
    g = parser.add_argument_group("train")
    g.add_argument("--epochs", type=int, help="training epochs (default: rocket train's)")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, help="learning rate (default: rocket train's)")
    g.add_argument("--batch-size", type=int, help="micro-batch per device (default: rocket train's)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--top-k", type=int, help="experts per token (default: 2)")
    g.add_argument("--cutoff", type=int, help="max tokens per example (default: rocket train's)")
    g.add_argument("--train-router-only", action="store_true", help="freeze the experts, train the routers")
    g.add_argument("--deepspeed", help="DeepSpeed config: a JSON file, or zero2 / zero3 (shipped)")
    g.add_argument("--backend", choices=["auto", "deepspeed", "torch"],
                   help="training loop: auto (DeepSpeed when usable, else plain torch; the default)")
    g = parser.add_argument_group("run")
    g.add_argument("--force", choices=STAGES, help="redo this stage and every later one")
    g.add_argument("--stop-after", choices=STAGES, help="stop after this stage")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


TRAIN_FLAGS = ("epochs", "lr", "batch_size", "grad_accum", "top_k", "cutoff", "deepspeed", "backend")


def config_from_args(args) -> RunConfig:
    train = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if args.train_router_only:
        train["train_router_only"] = True
    return RunConfig(base_model=args.base_model, bank=args.bank, kshot=args.kshot, opensource=args.opensource,
                     out=args.out, template=args.template, accuracy=args.accuracy, accuracy_file=args.accuracy_file,
                     max_new_tokens=args.max_new_tokens, max_tokens=args.max_tokens, dtype=args.dtype,
                     n_experts=args.n_experts, top_m=args.top_m, target=args.target, threshold=args.threshold,
                     embed_model=args.embed_model, prefix=args.prefix, train=train, device=str(args.device),
                     seed=args.seed, progress=not args.no_progress)


def main(args) -> int:
    cfg = config_from_args(args)
    status = run_pipeline(cfg, args.force, args.stop_after)
    ran = [s for s, v in status.items() if v == "ran"]
    print(f"rocket run: {cfg.out}: ran {', '.join(ran) or 'nothing'}"
          + (f"; skipped {', '.join(s for s, v in status.items() if v == 'skipped')}" if len(ran) < len(status) else "")
          + (f"; report: {Path(cfg.out) / 'report.html'}" if "report" in status else ""))
    return 0
