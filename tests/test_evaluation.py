"""rocket.evaluate / `rocket eval` on the tiny Llama: a MoE trained for a few steps against the base
model and each expert, every row checked against an independent computation (a plain-torch forward
per example, score_adapters, HF generate); the CLI end to end; bad inputs."""
import copy
import json
import re

import pytest
import torch

from rocket.adapters.bank import LoraBank
from rocket.cli import main as cli_main
from rocket.data.answers import answer_key
from rocket.data.examples import load_examples
from rocket.data.tokenize import tokenize_examples
from rocket.errors import DataError, EvaluationError
from rocket.evaluation import evaluate
from rocket.kernels import reference
from rocket.modeling import load_base
from rocket.moe.state import MOE_FILE, load_moe
from rocket.scoring.score import score_adapters
from rocket.training.loop import train
from tests.conftest import DATA

EXPERTS = ["qv_r4", "all_r8"]


@pytest.fixture(autouse=True)
def _cpu_reference(monkeypatch):
    # The CPU path of a real run is the torch reference (kernels.use_triton); the interpreted Triton
    # kernels are tested on their own and would only slow these runs down.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def experts_txt(lora_bank_dir, tmp_path_factory):
    """A manifest of two experts of the bank, in the order `rocket select` would write them."""
    path = tmp_path_factory.mktemp("experts") / "experts.txt"
    path.write_text("".join(f"{lora_bank_dir / n / 'adapter_model.safetensors'}\n" for n in EXPERTS))
    return path


@pytest.fixture(scope="module")
def moe_dir(_tiny_llama, tiny_tokenizer, kshot_examples, experts_txt, tmp_path_factory):
    """What `rocket train --out` writes: a real run of 4 steps on the K-shot data."""
    out = tmp_path_factory.mktemp("train") / "moe"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        train(copy.deepcopy(_tiny_llama), kshot_examples, experts_txt, out, tokenizer=tiny_tokenizer,
              backend="torch", device="cpu", progress=False, max_steps=4, lr=2e-2, batch_size=4, grad_accum=1,
              cutoff=512)
    return out


@pytest.fixture(scope="module")
def heldout_path(tmp_path_factory):
    """Six ARC-Challenge items that are not in the 10-shot training set."""
    path = tmp_path_factory.mktemp("heldout") / "test.jsonl"
    path.write_text("\n".join((DATA / "arc-c_50shot.jsonl").read_text().splitlines()[10:16]) + "\n")
    return path


@pytest.fixture
def moe_model(tiny_model_dir, moe_dir):
    return load_moe(tiny_model_dir, moe_dir, device="cpu")


@torch.no_grad()
def plain_losses(model, tokenizer, examples) -> torch.Tensor:
    """Per-example mean output-token loss: each example alone through the HF forward, float64."""
    out = []
    for t in tokenize_examples(examples, tokenizer):
        logits = model(input_ids=torch.tensor([t.input_ids])).logits
        out.append(float(reference.masked_cross_entropy_per_example(logits, torch.tensor([t.labels]))[0]))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def hf_generations(model, tokenizer, examples, max_new_tokens) -> list[str]:
    """Greedy continuations, one prompt at a time through transformers' generate."""
    texts = []
    for t in tokenize_examples(examples, tokenizer):
        ids = torch.tensor([t.input_ids[:t.prompt_len]])
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        texts.append(tokenizer.decode(g, skip_special_tokens=True))
    return texts


def test_rows_equal_independent_losses(tiny_llama, tiny_tokenizer, experts_txt, moe_model,
                                       heldout_path):
    examples = load_examples(heldout_path)
    bank = LoraBank.load(experts_txt)
    lines = []
    table = evaluate(tiny_llama, tiny_tokenizer, bank, moe_model, examples, accuracy=None, max_tokens=300,
                     progress=False, log=lines.append)
    assert [r.name for r in table.rows] == ["base", "adapter qv_r4", "adapter all_r8", "rocket MoE"]
    assert [r.kind for r in table.rows] == ["base", "adapter", "adapter", "moe"]
    assert all(r.examples == 6 and r.accuracy is None for r in table.rows) and table.extractor is None
    assert lines == []
    base, qv, allr, moe = (r.loss for r in table.rows)
    assert base == pytest.approx(float(plain_losses(tiny_llama, tiny_tokenizer, examples).mean()), abs=1e-5)
    scores = score_adapters(tiny_llama, tiny_tokenizer, bank, examples, accuracy=None, progress=False,
                            log=lambda *a: None)
    assert [qv, allr] == pytest.approx(scores.loss.mean(1).tolist(), abs=1e-6)
    assert moe == pytest.approx(float(plain_losses(moe_model, tiny_tokenizer, examples).mean()), abs=1e-5)
    assert len({round(r.loss, 4) for r in table.rows}) == 4  # rows apart by far more than the tolerances
    assert table.meta["label_tokens"] == sum(sum(l != -100 for l in t.labels[1:])
                                             for t in tokenize_examples(examples, tiny_tokenizer))
    margin = table.moe_vs_best()["loss"]
    best = min(table.rows[:3], key=lambda r: r.loss)
    assert margin == {"row": best.name, "delta": pytest.approx(moe - best.loss)}


def test_accuracy_rows_equal_hf_generate(tiny_llama, tiny_tokenizer, experts_txt, moe_model,
                                         heldout_path):
    """Golds made from the base model's own greedy output on half the items (wrong on the others), so
    its accuracy is 1/2 exactly; the base and MoE rows equal HF generate read by the same extractor."""
    n = 3
    examples = load_examples(heldout_path)
    said = hf_generations(tiny_llama, tiny_tokenizer, examples, n)
    assert all(s.strip() for s in said)
    golds = [dict(e, output=s if i % 2 == 0 else "not " + s) for i, (e, s) in enumerate(zip(examples, said))]
    table = evaluate(tiny_llama, tiny_tokenizer, LoraBank.load(experts_txt), moe_model, golds, accuracy="exact",
                     max_new_tokens=n, progress=False, log=lambda *a: None)
    key = answer_key(golds, "exact")
    moe_said = hf_generations(moe_model, tiny_tokenizer, golds, n)
    assert table.rows[0].accuracy == 0.5
    assert table.rows[-1].accuracy == sum(map(key.correct, range(6), moe_said)) / 6
    assert table.extractor == {"name": "exact", "auto": False, "reason": "given"}


def test_cli_writes_the_table(tiny_model_dir, experts_txt, moe_dir, heldout_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli_main(["eval", "--base-model", str(tiny_model_dir), "--moe", str(moe_dir), "--bank", str(experts_txt),
                     "--data", str(heldout_path), "--max-new-tokens", "2", "--out", str(out), "--no-progress",
                     "--device", "cpu"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == {"rows", "extractor", "moe_vs_best", "meta"}
    assert [r["name"] for r in report["rows"]] == ["base", "adapter qv_r4", "adapter all_r8", "rocket MoE"]
    assert all(set(r) == {"name", "kind", "loss", "accuracy", "examples"} and r["examples"] == 6
               and 0 <= r["accuracy"] <= 1 for r in report["rows"])
    assert report["extractor"]["name"] == "choice" and report["extractor"]["auto"] is True
    assert report["meta"]["data"] == str(heldout_path) and report["meta"]["moe"] == str(moe_dir)
    header = next(i for i, line in enumerate(printed) if line.startswith("held-out evaluation on 6 examples"))
    assert "extractor 'choice' (auto: " in printed[header]
    body = printed[header + 2:header + 6]
    by_loss = sorted(report["rows"], key=lambda r: r["loss"])
    assert [line.split("  ")[0].strip() for line in body] == [r["name"] for r in by_loss]
    assert printed[header + 6].startswith("rocket MoE vs the best other row: loss ")
    assert printed[-1] == f"wrote {out}"
    # the same numbers as the API on the same models
    base, tokenizer = load_base(tiny_model_dir, torch.device("cpu"))
    table = evaluate(base, tokenizer, LoraBank.load(experts_txt), load_moe(tiny_model_dir, moe_dir, device="cpu"),
                     load_examples(heldout_path), max_new_tokens=2, progress=False, log=lambda *a: None)
    assert [r["loss"] for r in report["rows"]] == pytest.approx([r.loss for r in table.rows], abs=1e-6)
    assert [r["accuracy"] for r in report["rows"]] == [r.accuracy for r in table.rows]


def _fail(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize("case, message", [
    ("missing data", r"missing\.jsonl: no such file$"),
    ("out is the data", r"--out .*test\.jsonl: the same file as --data; it would be overwritten$"),
    ("out is the manifest", r"--out .*experts\.txt: the same file as --bank; it would be overwritten$"),
    ("out is the MoE", rf"--out .*{MOE_FILE}: the same file as --moe; it would be overwritten$"),
    ("no MoE", rf"empty: no rocket_moe_config\.json or {MOE_FILE} \(expected a rocket train output or checkpoint\)$"),
    ("unreadable gold", r"test\.jsonl:2: the gold output 'B\. breaking a glass' has no answer for extractor 'number'$"),
    ("no base model", r"missing-model: no such model directory$"),
    ("no bank", r"missing-bank: expected a directory of peft adapters or a manifest \.txt$"),
])
def test_cli_bad_inputs_are_one_line_before_any_model_loads(case, message, monkeypatch, tiny_model_dir, experts_txt,
                                                           moe_dir, heldout_path, tmp_path, capsys):
    monkeypatch.setattr("rocket.modeling.load_model", _fail)
    monkeypatch.setattr("rocket.moe.state.load_model", _fail)
    (tmp_path / "empty").mkdir()
    args = {"--base-model": str(tiny_model_dir), "--moe": str(moe_dir), "--bank": str(experts_txt),
            "--data": str(heldout_path), "--out": str(tmp_path / "eval.json")}
    args.update({"missing data": {"--data": str(tmp_path / "missing.jsonl")},
                 "out is the data": {"--out": str(heldout_path)},
                 "out is the manifest": {"--out": str(experts_txt)},
                 "out is the MoE": {"--out": str(moe_dir / MOE_FILE)},
                 "no MoE": {"--moe": str(tmp_path / "empty")},
                 "unreadable gold": {"--accuracy": "number"},
                 "no base model": {"--base-model": str(tmp_path / "missing-model")},
                 "no bank": {"--bank": str(tmp_path / "missing-bank")}}[case])
    code = cli_main(["eval", *[x for kv in args.items() for x in kv], "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("rocket eval: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "eval.json").exists()


def test_api_bad_inputs(tiny_llama, tiny_tokenizer, experts_txt, moe_model, heldout_path):
    bank, examples = LoraBank.load(experts_txt), load_examples(heldout_path)

    def run(model, moe, data=examples):
        evaluate(model, tiny_tokenizer, bank, moe, data, progress=False, log=lambda *a: None)

    with pytest.raises(EvaluationError, match=r"^evaluation: no examples \(the held-out data is empty\)$"):
        run(tiny_llama, moe_model, [])
    with pytest.raises(EvaluationError, match=r"^evaluation: the base model carries LoRA-MoE layers; "):
        run(moe_model, moe_model)
    with pytest.raises(EvaluationError, match=r"^evaluation: the MoE model has no LoRA-MoE layers "):
        run(tiny_llama, copy.deepcopy(tiny_llama))
    with pytest.raises(EvaluationError, match=r"^evaluation: the MoE model is in training mode"):
        run(tiny_llama, moe_model.train())
    moe_model.eval()
    with pytest.raises(DataError, match=r"test\.jsonl:2: the gold output 'B\. breaking a glass' has no answer"):
        evaluate(tiny_llama, tiny_tokenizer, bank, moe_model, examples, accuracy="number", progress=False)
