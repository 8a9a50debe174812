"""`rocket run`: outputs, resume stage by stage, reruns after changes, nothing half-written."""
import os
from pathlib import Path

import pytest

from rocket.cli import main as cli_main
from rocket.data.examples import load_examples, write_jsonl
from rocket.pipeline.run import STAGES, PipelineError, RunConfig, run_pipeline

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
                progress=False)
    base.update(kw)
    return RunConfig(**base)


def mtimes(out: Path) -> dict:
    return {o: (out / o).stat().st_mtime_ns for o in OUTPUTS}


def test_run_writes_every_output_then_skips(inputs, tiny_model_dir, lora_bank_dir, tmp_path):
    cfg = config(inputs, tiny_model_dir, lora_bank_dir, tmp_path / "run")
    assert run_pipeline(cfg, log=lambda *a: None) == {s: "ran" for s in STAGES}
    out = Path(cfg.out)
    for o in OUTPUTS:
        assert (out / o).exists(), o
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


def test_cli_run_and_clear_error(inputs, tiny_model_dir, lora_bank_dir, tmp_path, capsys):
    args = ["run", "--base-model", str(tiny_model_dir), "--bank", str(lora_bank_dir), "--kshot",
            str(inputs / "kshot.jsonl"), "--opensource", str(inputs / "pool.jsonl"), "--out", str(tmp_path / "r"),
            "--n-experts", "2", "--top-m", "3", "--target", "8", "--stop-after", "augment", "--no-progress",
            "--device", "cpu"]
    assert cli_main(args) == 0
    assert "ran score, select, augment" in capsys.readouterr().out
    bad = list(args)
    bad[bad.index("--base-model") + 1] = str(tmp_path / "missing")
    bad[bad.index("--out") + 1] = str(tmp_path / "r2")
    assert cli_main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
