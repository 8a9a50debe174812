"""`rocket run`: outputs, resume stage by stage, reruns after changes, nothing half-written."""
import copy
import json
import os
from pathlib import Path

import pytest

from rocket.adapters.bank import LoraBank
from rocket.cli import build_parser, main as cli_main
from rocket.data.examples import DataError, load_examples, write_jsonl
from rocket.data.tokenize import tokenize_examples
from rocket.pipeline.cli import config_from_args
from rocket.pipeline.run import STAGES, Pipeline, PipelineError, RunConfig, run_pipeline
from rocket.training.config import TrainError
from rocket.runtime.adapters import multi_lora_model
from rocket.runtime.generation import greedy_generate

OUTPUTS = ["scores.json", "heatmap.png", "experts.txt", "experts.json", "similarity.png", "aug.jsonl", "aug.json",
           "checkpoint/moe.safetensors", "routing.json", "report.html"]


@pytest.fixture(autouse=True)
def reference_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # kernels are tested elsewhere; keep this fast


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, kshot_examples):
    root = tmp_path_factory.mktemp("inputs")
    kshot = kshot_examples[:3]
    write_jsonl(root / "kshot.jsonl", kshot)
    pool = [dict(e, output=e["output"] + suffix) for e in kshot_examples for suffix in ("", " Indeed.")]
    write_jsonl(root / "pool.jsonl", pool)
    return root


def config(inputs, tiny_model_dir, lora_bank_dir, out, **kw):
    base = dict(base_model=str(tiny_model_dir), bank=str(lora_bank_dir), kshot=str(inputs / "kshot.jsonl"),
                pool=str(inputs / "pool.jsonl"), out=str(out), n_experts=2, top_m=3, target=10,
                threshold=0.9, train=dict(epochs=1, batch_size=4, grad_accum=1, cutoff=512, backend="torch"), device="cpu",
                accuracy=None, progress=False)
    base.update(kw)
    return RunConfig(**base)


def mtimes(out: Path) -> dict:
    return {o: (out / o).stat().st_mtime_ns for o in OUTPUTS}


def test_run_writes_every_output_then_skips(inputs, tiny_model_dir, lora_bank_dir, tmp_path):
    cfg = config(inputs, tiny_model_dir, lora_bank_dir, tmp_path / "run", eval_data=str(inputs / "kshot.jsonl"))
    assert run_pipeline(cfg, log=lambda *a: None) == {s: "ran" for s in STAGES}
    out = Path(cfg.out)
    for o in OUTPUTS:
        assert (out / o).exists(), o
    evaluation = json.loads((out / "eval.json").read_text())
    assert [r["kind"] for r in evaluation["rows"]] == ["base"] + ["adapter"] * cfg.n_experts + ["moe"]
    assert "Held-out evaluation" in (out / "report.html").read_text()
    assert len(load_examples(out / "aug.jsonl")) <= cfg.target
    assert [Path(p).is_dir() for p in (out / "experts.txt").read_text().splitlines()[1:]] == [True] * cfg.n_experts
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    before = mtimes(out)
    assert run_pipeline(cfg, log=lambda *a: None) == {s: "skipped" for s in STAGES}
    assert mtimes(out) == before

    # an augment option changed: score and select are kept, augment and everything after rerun
    cfg.threshold = 0.5
    assert run_pipeline(cfg, log=lambda *a: None) == dict(score="skipped", select="skipped", augment="ran",
                                                          train="ran", report="ran")
    # a missing output reruns its stage and the later ones
    (out / "experts.txt").unlink()
    status = run_pipeline(cfg, log=lambda *a: None)
    assert status["score"] == "skipped" and status["select"] == "ran" and status["train"] == "ran"
    # --force redoes a stage even when it is complete
    assert run_pipeline(cfg, force="report", log=lambda *a: None)["report"] == "ran"


def test_killed_run_resumes_at_the_failed_stage(inputs, tiny_model_dir, lora_bank_dir, tmp_path, monkeypatch):
    import rocket.training.loop

    cfg = config(inputs, tiny_model_dir, lora_bank_dir, tmp_path / "run")

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rocket.training.loop, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, log=lambda *a: None)
    out = Path(cfg.out)
    assert (out / "aug.jsonl").is_file() and not (out / "checkpoint").exists()
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    os.environ["TRITON_INTERPRET"] = "0"
    status = run_pipeline(cfg, log=lambda *a: None)
    assert status == dict(score="skipped", select="skipped", augment="skipped", train="ran", report="ran")
    assert (out / "checkpoint" / "moe.safetensors").is_file() and not (out / "checkpoint.partial").exists()


def test_stop_after_and_bad_stage(inputs, tiny_model_dir, lora_bank_dir, tmp_path):
    cfg = config(inputs, tiny_model_dir, lora_bank_dir, tmp_path / "run")
    assert run_pipeline(cfg, stop_after="select", log=lambda *a: None) == dict(score="ran", select="ran")
    assert not (tmp_path / "run" / "aug.jsonl").exists()
    with pytest.raises(PipelineError, match="not a stage"):
        run_pipeline(cfg, force="polish", log=lambda *a: None)


def test_cuda_graphs_on_the_cpu_stop_the_run_before_its_first_stage(inputs, tiny_model_dir, lora_bank_dir, tmp_path):
    parse = build_parser("run").parse_args
    argv = ["run", "--base-model", "m", "--bank", "b", "--kshot", "k.jsonl", "--pool", "p.jsonl", "--out", "o"]
    assert config_from_args(parse(argv + ["--cuda-graphs"])).train == {"cuda_graphs": True}
    assert "cuda_graphs" not in config_from_args(parse(argv)).train
    cfg = config(inputs, tiny_model_dir, lora_bank_dir, tmp_path / "run",
                 train=dict(epochs=1, backend="torch", cuda_graphs=True))
    with pytest.raises(TrainError, match="^--cuda-graphs needs a CUDA device, got cpu$"):
        run_pipeline(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_cli_run_and_clear_error(inputs, tiny_model_dir, lora_bank_dir, tmp_path, capsys):
    args = ["run", "--base-model", str(tiny_model_dir), "--bank", str(lora_bank_dir), "--kshot",
            str(inputs / "kshot.jsonl"), "--opensource", str(inputs / "pool.jsonl"), "--out", str(tmp_path / "r"),
            "--n-experts", "2", "--top-m", "3", "--target", "8", "--stop-after", "augment", "--no-progress",
            "--no-accuracy", "--device", "cpu"]
    assert cli_main(args) == 0
    assert "ran score, select, augment" in capsys.readouterr().out
    bad = list(args)
    bad[bad.index("--base-model") + 1] = str(tmp_path / "missing")
    bad[bad.index("--out") + 1] = str(tmp_path / "r2")
    assert cli_main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_run_scores_accuracy_by_default_and_reasoning_perplexity(inputs, tiny_llama, tiny_tokenizer, tiny_model_dir,
                                                                lora_bank_dir, kshot_examples, tmp_path):
    """RunConfig's default accuracy is 'auto'; --kshot-cot feeds the losses and is an input of the score stage."""
    bank = LoraBank.load(lora_bank_dir)
    kshot = copy.deepcopy(kshot_examples[:3])
    prompts = [t.input_ids[:t.prompt_len] for t in tokenize_examples(kshot, tiny_tokenizer)]
    with multi_lora_model(tiny_llama, bank) as rows:
        gens = greedy_generate(tiny_llama, rows, prompts, len(bank), tiny_tokenizer.eos_token_id,
                               tiny_tokenizer.pad_token_id, 4, progress=False)
    for k in (0, 1):  # adapter 1 answers these as the golds say
        kshot[k]["output"] = tiny_tokenizer.decode(gens[1][k], skip_special_tokens=True)
    write_jsonl(tmp_path / "kshot.jsonl", kshot)
    cot = tmp_path / "cot.jsonl"
    write_jsonl(cot, [dict(e, output=e["output"] + " because it is so") for e in kshot_examples[:5]])
    cfg = config(inputs, tiny_model_dir, lora_bank_dir, tmp_path / "run", kshot=str(tmp_path / "kshot.jsonl"),
                 kshot_cot=str(cot), max_new_tokens=4, accuracy=RunConfig.accuracy)  # the default
    assert cfg.accuracy == "auto"
    log = []
    assert run_pipeline(cfg, stop_after="score", log=log.append) == dict(score="ran")
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    meta = scores["meta"]
    assert meta["accuracy_auto"] is True and meta["accuracy_examples"] == 3 and scores["accuracy"][1] >= 2 / 3
    assert meta["perplexity"] == "reasoning" and meta["data_cot"] == str(cot) and scores["examples"] == 5
    assert "perplexity: reasoning on 5 examples" in log and any(line.startswith("accuracy: extractor") for line in log)
    assert run_pipeline(cfg, stop_after="score", log=log.append) == dict(score="skipped")
    write_jsonl(cot, [dict(e, output=e["output"] + " because it is so") for e in kshot_examples[:4]])
    assert run_pipeline(cfg, stop_after="score", log=log.append) == dict(score="ran")


def test_run_checks_golds_before_loading_the_model(inputs, tiny_model_dir, lora_bank_dir, tmp_path, monkeypatch):
    def no_model(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Pipeline, "base", no_model)
    cfg = config(inputs, tiny_model_dir, lora_bank_dir, tmp_path / "run", accuracy="number")
    with pytest.raises(DataError, match=rf"^{inputs / 'kshot.jsonl'}:1: the gold output 'A. dry palms' has no answer "
                                        "for extractor 'number'$"):
        run_pipeline(cfg, log=lambda *a: None)


def test_cli_run_accuracy_flags(tmp_path):
    argv = ["run", "--base-model", "m", "--bank", "b", "--kshot", "k.jsonl", "--pool", "p.jsonl", "--out", "o"]
    parse = build_parser("run").parse_args
    assert config_from_args(parse(argv)).accuracy == "auto"
    cfg = config_from_args(parse(argv + ["--no-accuracy", "--kshot-cot", "cot.jsonl"]))
    assert cfg.accuracy is None and cfg.kshot_cot == "cot.jsonl" and cfg.max_new_tokens == 256
    assert config_from_args(parse(argv + ["--accuracy", "number"])).accuracy == "number"
    with pytest.raises(SystemExit):
        parse(argv + ["--no-accuracy", "--accuracy-file", "acc.json"])
