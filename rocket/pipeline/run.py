"""`rocket run`: score → select → augment → train → report in one run directory, resumable.

Every stage writes its outputs atomically and then a stamp (`RUN_DIR/.rocket/<stage>.json`) with
the configuration it ran with, fingerprints of its input files and the stamps of the stages it
builds on. A stage is skipped when its stamp matches and all its outputs exist; any change of its
options, of an input file or of an upstream result runs it (and so everything after it) again.
A run killed mid-way therefore resumes at the first stage that had not finished.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
import torch
from rocket.data.answers import DEFAULT_MAX_NEW_TOKENS
from rocket.io import write_json
from rocket.modeling import default_device, load_base
from rocket.resume import Stamps, digest, fingerprint
from rocket.errors import PipelineError


STAGES = ("score", "select", "augment", "train", "report")



@dataclass
class RunConfig:
    """Everything `rocket run` needs; the stage options mirror the stage commands' flags."""
    base_model: str
    bank: str
    kshot: str
    pool: str
    out: str
    tokenizer: str | None = None           # a tokenizer directory instead of the one saved with base_model
    # score
    template: str = "alpaca"
    kshot_cot: str | None = None           # the K-shot set with rationales: reasoning perplexity on it
    accuracy: str | None = "auto"          # extractor: auto, choice, number, exact; None: the ablation
    accuracy_file: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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
    # report: held-out data to compare the MoE with the base model and each expert on (rocket eval)
    eval_data: str | None = None
    # everywhere
    device: str | None = None
    seed: int = 0
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        return Path(self.out)


class Pipeline:
    """One run directory; `run()` executes the stages that are not already done."""

    def __init__(self, cfg: RunConfig, log=print):
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.device = default_device(cfg.device)
        self.stamps = Stamps(self.dir)
        self.log = log
        self._base = None
        self._bank = None
        self.status: dict[str, str] = {}

    # ---- shared inputs, loaded once and only when a stage needs them
    def base(self):
        if self._base is None:
            self._base = load_base(self.cfg.base_model, self.device, self.cfg.dtype, self.cfg.tokenizer)
        return self._base

    def bank(self):
        if self._bank is None:
            from rocket.adapters.bank import LoraBank
            self._bank = LoraBank.load(self.cfg.bank, progress=self.cfg.progress)
        return self._bank

    def p(self, name: str) -> Path:
        return self.dir / name

    def _bank_inputs(self) -> list[str]:
        """The bank as stage inputs: a manifest and every adapter directory it lists, so a changed
        adapter file reruns scoring even when the .txt itself is unchanged."""
        from rocket.adapters.bank import bank_entries

        bank = Path(self.cfg.bank)
        if not bank.is_file():
            return [str(bank)]
        return [str(bank)] + [str(p if p.is_dir() else p.parent) for _, p in bank_entries(bank)]

    # ---- stage table: name → (outputs, inputs, options, function)
    def _plan(self):
        c = self.cfg
        bank = self._bank_inputs()
        model = [c.base_model] + ([c.tokenizer] if c.tokenizer else [])
        return {
            "score": (["scores.json", "heatmap.png"], [*model, *bank, c.kshot] +
                      ([c.kshot_cot] if c.kshot_cot else []) + ([c.accuracy_file] if c.accuracy_file else []),
                      dict(template=c.template, accuracy=c.accuracy, max_new_tokens=c.max_new_tokens,
                           perplexity="reasoning" if c.kshot_cot else "vanilla", dtype=c.dtype,
                           device=self.device.type), self._score),
            "select": (["experts.txt", "experts.json", "similarity.png"], bank,
                       dict(n_experts=c.n_experts, top_m=c.top_m), self._select),
            "augment": (["aug.jsonl", "aug.json"], [c.kshot, c.pool],
                        dict(target=c.target, threshold=c.threshold, embed_model=c.embed_model, prefix=c.prefix,
                             seed=c.seed), self._augment),
            "train": (["checkpoint"], model, dict(train=c.train, seed=c.seed, device=self.device.type),
                      self._train),
            "report": (["routing.json", "report.html"] + (["eval.json"] if c.eval_data else []),
                       [c.eval_data] if c.eval_data else [], dict(eval_data=bool(c.eval_data)), self._report),
        }

    def validate(self) -> None:
        """Every option of every stage and every input, checked before the first stage runs: a run
        must not fail after hours of scoring on an option of its last stage."""
        from rocket.adapters.bank import bank_entries
        from rocket.data.examples import load_examples
        from rocket.data.templates import PromptTemplate
        from rocket.modeling import check_model_dir, check_tokenizer_dir
        from rocket.scoring.accuracy import plan_accuracy
        from rocket.training.config import TrainConfig

        c = self.cfg
        check_model_dir(c.base_model)
        check_tokenizer_dir(c.base_model, c.tokenizer)
        bank = bank_entries(c.bank)
        for name, path in (("--pool", c.pool), ("--kshot-cot", c.kshot_cot), ("--accuracy-file", c.accuracy_file),
                           ("--eval-data", c.eval_data)):
            if path is not None and not Path(path).is_file():
                raise PipelineError(f"{name} {path}: no such file")
        if self.dir.exists() and not self.dir.is_dir():
            raise PipelineError(f"--out {self.dir}: a file, expected a run directory")
        if c.template != "chat":
            PromptTemplate.get(c.template)
        kshot = load_examples(c.kshot)
        if c.kshot_cot:
            load_examples(c.kshot_cot)
        if c.eval_data:
            from rocket.evaluation.compare import load_eval_examples
            load_eval_examples(c.eval_data, c.accuracy)
        plan_accuracy(kshot, c.accuracy, c.accuracy_file)  # every gold readable
        for name, value in (("--n-experts", c.n_experts), ("--top-m", c.top_m), ("--target", c.target)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PipelineError(f"{name} must be a positive integer, got {value!r}")
        if c.n_experts > c.top_m:
            raise PipelineError(f"--n-experts {c.n_experts} > --top-m {c.top_m}: the experts are chosen among the top M")
        if c.n_experts > len(bank):
            raise PipelineError(f"--n-experts {c.n_experts}: the bank {c.bank} has only {len(bank)} adapters")
        if c.target < len(kshot):
            raise PipelineError(f"--target {c.target} is smaller than the {len(kshot)} K-shot items it includes")
        if not (isinstance(c.threshold, (int, float)) and -1.0 <= c.threshold <= 1.0):
            raise PipelineError(f"--threshold must be a cosine in [-1, 1], got {c.threshold!r}")
        options = {k: v for k, v in c.train.items() if k not in ("deepspeed", "backend")}
        train_cfg = TrainConfig.from_dict({"template": c.template, "seed": c.seed, **options})
        if train_cfg.cuda_graphs:
            from rocket.training.engines import check_cuda_graphs
            check_cuda_graphs(c.train.get("backend", "auto"), c.train.get("deepspeed"), self.device)
        if train_cfg.top_k > c.n_experts:
            raise PipelineError(f"--top-k {train_cfg.top_k} > --n-experts {c.n_experts}: a token cannot use more "
                                "experts than the mixture has")

    def run(self, force: str | None = None, stop_after: str | None = None) -> dict:
        """Run every stage not already done (from `force` on, all are redone); stop after
        `stop_after`. Returns {stage: 'ran' | 'skipped'} (and the stages not reached are absent)."""
        for name, value in (("force", force), ("stop_after", stop_after)):
            if value is not None and value not in STAGES:
                raise PipelineError(f"--{name.replace('_', '-')} {value}: not a stage ({', '.join(STAGES)})")
        self.validate()
        self.dir.mkdir(parents=True, exist_ok=True)
        plan = self._plan()
        upstream = []
        redo = False
        for stage in STAGES:
            outputs, inputs, options, fn = plan[stage]
            redo = redo or stage == force
            key = digest({"options": options, "inputs": [fingerprint(p) for p in inputs], "upstream": upstream})
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
        from rocket.data.examples import load_examples
        from rocket.scoring.accuracy import plan_accuracy
        from rocket.scoring.heatmap import save_heatmap
        from rocket.scoring.score import score_adapters, score_summary

        c = self.cfg
        examples = load_examples(c.kshot)
        cot = load_examples(c.kshot_cot) if c.kshot_cot else None
        plan_accuracy(examples, c.accuracy, c.accuracy_file)  # every gold readable, before the model loads
        model, tokenizer = self.base()
        scores = score_adapters(model, tokenizer, self.bank(), examples, c.template, accuracy=c.accuracy,
                                accuracy_file=c.accuracy_file, perplexity_examples=cot,
                                max_new_tokens=c.max_new_tokens, max_tokens=c.max_tokens, progress=c.progress,
                                log=self.log)
        scores.meta.update(base_model=str(c.base_model), tokenizer=c.tokenizer, bank=str(c.bank), data=str(c.kshot),
                           data_cot=c.kshot_cot)
        save_heatmap(scores, self.p("heatmap.png"))
        scores.save(self.p("scores.json"))
        self.log(f"[score] {score_summary(scores)}")
        best = int(torch.argmin(scores.ppl_sum))
        return {"adapters": len(scores.names), "examples": scores.loss.shape[1], "lowest_ppl_r": scores.names[best],
                "base_ppl_r": scores.base_ppl_sum}

    def _select(self) -> dict:
        from rocket.data.scores import Scores
        from rocket.selection.ranking import select_experts
        from rocket.selection.outputs import write_outputs

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
        from rocket.augment.build import select_data
        from rocket.data.examples import load_examples, write_jsonl

        c = self.cfg
        kshot, pool = load_examples(c.kshot), load_examples(c.pool)
        examples, report = select_data(kshot, pool, c.target, c.threshold, embedder=c.embed_model,
                                       prefix=c.prefix, batch_size=c.embed_batch_size, device=self.device,
                                       seed=c.seed, progress=c.progress)
        report.update(pool_path=str(c.pool), kshot_path=str(c.kshot))
        write_json(self.p("aug.json"), report)
        write_jsonl(self.p("aug.jsonl"), examples)
        return dict(report["counts"])

    def _train(self) -> dict:
        from rocket.training.loop import train

        c = self.cfg
        final, partial = self.p("checkpoint"), self.p("checkpoint.partial")
        # Training runs in checkpoint.partial/ and is renamed to checkpoint/ only when it has finished,
        # so checkpoint/ always means complete. A killed run resumes from the last checkpoint inside
        # checkpoint.partial/ when it belongs to the same training run (train's resume="auto").
        options = dict(c.train)
        deepspeed = options.pop("deepspeed", None)
        backend = options.pop("backend", "auto")
        options.setdefault("template", c.template)
        options.setdefault("seed", c.seed)
        if any((partial / "checkpoints").glob("step-*")):
            self.log(f"[train] {partial} holds checkpoints of an interrupted run: training continues from the "
                     "newest if it belongs to this run (same settings, data and experts), else from step 0")
        result = train(c.base_model, str(self.p("aug.jsonl")), str(self.p("experts.txt")), partial,
                       tokenizer=c.tokenizer, deepspeed_config=deepspeed, backend=backend, device=self.device,
                       resume="auto", progress=c.progress, **options)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        losses = result.losses
        return {"steps": result.steps, "backend": result.backend, "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "seconds": result.seconds}

    def _report(self) -> dict:
        from rocket.report import routing_stats, write_report

        c = self.cfg
        write_json(self.p("routing.json"), routing_stats(self))
        summary = {}
        if c.eval_data:
            from rocket.evaluation.compare import evaluate_files
            table = evaluate_files(c.base_model, self.p("checkpoint"), self.p("experts.txt"), c.eval_data,
                                   device=self.device, template=c.template, accuracy=c.accuracy,
                                   max_new_tokens=c.max_new_tokens, progress=c.progress, log=self.log,
                                   tokenizer=c.tokenizer)
            table.save(self.p("eval.json"))
            self.log(table.format())
            summary["eval_rows"] = len(table.rows)
        write_report(self.dir, self.p("report.html"))
        return summary


def run_pipeline(cfg: RunConfig, force: str | None = None, stop_after: str | None = None, log=print) -> dict:
    """Run (or resume) the whole pipeline; see Pipeline.run."""
    return Pipeline(cfg, log).run(force, stop_after)
