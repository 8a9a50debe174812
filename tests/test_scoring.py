"""rocket.score_adapters vs a per-adapter peft loop (set_adapter, batch 1) on the tiny Llama with the
mixed-rank bank; multi-adapter greedy decoding vs peft's generate; CLI; bad inputs."""
import copy
import json
import os
import time

import pytest
import torch

from rocket.adapters.bank import BankError, LoraBank
from rocket.cli import main as cli_main
from rocket.data.examples import DataError
from rocket.data.tokenize import tokenize_examples
from rocket.errors import RocketError, ScoringError
from rocket.data.examples import load_examples, write_jsonl
from rocket.runtime.generation import greedy_generate
from rocket.kernels import reference
from rocket.runtime.packing import pack_rows
from rocket.data.scores import Scores
from rocket.runtime.adapters import multi_lora_model
from rocket.scoring.score import score_adapters
from rocket.tiny import build_llama, make_random_adapter
from tests.conftest import DATA


@pytest.fixture
def reference_path(monkeypatch):
    """Dispatch to the torch references on the CPU (the interpreter is for the kernel tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _peft_model(model, bank_dir, names):
    from peft import PeftModel
    pm = PeftModel.from_pretrained(model, str(bank_dir / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(bank_dir / n), adapter_name=n)
    return pm.eval()


@torch.no_grad()
def peft_losses(model, bank_dir, names, tokenized):
    pm = _peft_model(model, bank_dir, names)
    out = torch.zeros(len(names), len(tokenized), dtype=torch.float64)
    device = next(pm.parameters()).device
    for a, n in enumerate(names):
        pm.set_adapter(n)
        for k, t in enumerate(tokenized):
            logits = pm(input_ids=torch.tensor([t.input_ids], device=device)).logits
            out[a, k] = reference.masked_cross_entropy_per_example(logits, torch.tensor([t.labels], device=device))[0]
    return out


@torch.no_grad()
def peft_generations(model, bank_dir, names, prompts, eos, pad, max_new_tokens):
    pm = _peft_model(model, bank_dir, names)
    out = []
    for n in names:
        pm.set_adapter(n)
        row = []
        for p in prompts:
            ids = torch.tensor([p])
            g = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=eos, pad_token_id=pad)[0, len(p):].tolist()
            row.append(g[:g.index(eos)] if eos in g else g)
        out.append(row)
    return out


@pytest.fixture(scope="module")
def peft_reference(_tiny_llama, tiny_tokenizer, lora_bank_dir, kshot_examples):
    """Losses [4, 10] of the per-adapter peft loop (set_adapter, batch 1), float32."""
    names = LoraBank.load(lora_bank_dir).names
    return peft_losses(copy.deepcopy(_tiny_llama), lora_bank_dir, names, tokenize_examples(kshot_examples, tiny_tokenizer))


@pytest.mark.parametrize("strategy", ["sgmv", "merged"])
def test_losses_equal_peft_loop_fp32(reference_path, strategy, tiny_llama, tiny_tokenizer, lora_bank_dir,
                                     kshot_examples, peft_reference):
    bank = LoraBank.load(lora_bank_dir)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    # a small token budget: several packed passes, rows of mixed adapters and lengths
    scores = score_adapters(tiny_llama, tiny_tokenizer, bank, kshot_examples, "alpaca", accuracy=None,
                            max_tokens=700, progress=False, strategy=strategy)
    want = peft_reference
    assert scores.names == bank.names and scores.loss.shape == (4, 10) and scores.meta["strategy"] == strategy
    assert torch.allclose(scores.loss, want, rtol=0, atol=2e-5)
    assert torch.allclose(scores.ppl_sum, torch.exp(want).sum(1), rtol=1e-4)
    assert torch.equal(scores.loss.argmin(0), want.argmin(0))  # adapters differ: the check can fail
    assert all(type(m).__name__ != "MultiLoraLinear" for m in tiny_llama.modules())  # unwrapped again
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())  # weights restored
    assert tiny_llama.config._attn_implementation != "rocket_packed"


def test_models_without_packing_score_one_row_per_pass(reference_path, monkeypatch, tiny_llama, tiny_tokenizer,
                                                      lora_bank_dir, kshot_examples, peft_reference):
    monkeypatch.setattr("rocket.runtime.losses.supports_packing", lambda model: False)
    scores = score_adapters(tiny_llama, tiny_tokenizer, LoraBank.load(lora_bank_dir).subset([0, 2]),
                            kshot_examples[:4], accuracy=None, progress=False, strategy="sgmv")
    assert torch.allclose(scores.loss, peft_reference[[0, 2], :4], rtol=0, atol=2e-5)


def test_progress_bar_counts_pairs(reference_path, tiny_llama, tiny_tokenizer, lora_bank_dir, kshot_examples, capsys):
    score_adapters(tiny_llama, tiny_tokenizer, LoraBank.load(lora_bank_dir), kshot_examples[:3], accuracy=None,
                   max_tokens=300)
    err = capsys.readouterr().err
    assert "scoring" in err and "12/12" in err


def test_triton_kernels_in_scoring_equal_peft(tiny_llama, tiny_tokenizer, lora_bank_dir, kshot_examples):
    """The same comparison through the Triton kernels (interpreter on the CPU, GPU otherwise)."""
    bank = LoraBank.load(lora_bank_dir)
    names, examples = [bank.names[1], bank.names[3]], kshot_examples[:2]
    want = peft_losses(copy.deepcopy(tiny_llama), lora_bank_dir, names, tokenize_examples(examples, tiny_tokenizer))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores = score_adapters(tiny_llama.to(device), tiny_tokenizer, bank.subset([1, 3]), examples, accuracy=None,
                            max_tokens=300, progress=False, strategy="sgmv")
    assert torch.allclose(scores.loss, want, rtol=0, atol=5e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["sgmv", "merged"])
def test_bf16_on_gpu_close_to_fp32_peft(strategy, tiny_llama, tiny_tokenizer, lora_bank_dir, kshot_examples,
                                        peft_reference):
    """Packed passes with flash varlen attention, SGMV or merged weights, in bf16."""
    bank = LoraBank.load(lora_bank_dir)
    scores = score_adapters(tiny_llama.cuda().bfloat16(), tiny_tokenizer, bank, kshot_examples, accuracy=None,
                            progress=False, strategy=strategy, max_tokens=900)
    assert (scores.loss - peft_reference).abs().max() < 0.05


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_generation_equals_peft_greedy_fp32(reference_path, device, tiny_llama, tiny_tokenizer, lora_bank_dir,
                                            kshot_examples):
    """Token for token, mixed-rank adapters, rows stopping at different steps (cuda: the Triton SGMV)."""
    bank = LoraBank.load(lora_bank_dir)
    tok = tokenize_examples(kshot_examples[:5], tiny_tokenizer)
    prompts = [t.input_ids[:t.prompt_len] for t in tok]
    pad = tiny_tokenizer.pad_token_id
    free = peft_generations(copy.deepcopy(tiny_llama), lora_bank_dir, bank.names, prompts,
                            tiny_tokenizer.eos_token_id, pad, 10)
    # a frequent generated token as EOS: rows stop at different steps, some before the end
    eos = max(set(sum(sum(free, []), [])), key=lambda t: sum(sum(free, []), []).count(t))
    want = peft_generations(copy.deepcopy(tiny_llama), lora_bank_dir, bank.names, prompts, eos, pad, 10)
    assert len({len(g) for g in sum(want, [])}) > 1
    tiny_llama.to(device)
    with multi_lora_model(tiny_llama, bank) as rows:
        got = greedy_generate(tiny_llama, rows, prompts, len(bank), eos, pad, max_new_tokens=10, max_tokens=200,
                              progress=False)
        got_free = greedy_generate(tiny_llama, rows, prompts, len(bank), tiny_tokenizer.eos_token_id, pad,
                                   max_new_tokens=10, progress=False)
    assert got == want and got_free == free


def _fail(*args, **kwargs):
    raise AssertionError("a scoring pass ran")


def test_accuracy_on_by_default_and_reasoning_perplexity(reference_path, tiny_llama, tiny_tokenizer, lora_bank_dir,
                                                         kshot_examples, peft_reference):
    """accuracy='auto' by default (here 'exact': half the golds are free text) on `examples`; the losses come
    from the rationale set `perplexity_examples`; accuracy=None and no rationale set: the ablation, vanilla."""
    bank = LoraBank.load(lora_bank_dir)
    examples = copy.deepcopy(kshot_examples[:4])
    tok = tokenize_examples(examples, tiny_tokenizer)
    gens = peft_generations(copy.deepcopy(tiny_llama), lora_bank_dir, bank.names,
                            [t.input_ids[:t.prompt_len] for t in tok], tiny_tokenizer.eos_token_id,
                            tiny_tokenizer.pad_token_id, 6)
    for k in (0, 1):  # adapter 2 gets these right
        examples[k]["output"] = tiny_tokenizer.decode(gens[2][k], skip_special_tokens=True)
    want = torch.tensor([[tiny_tokenizer.decode(g, skip_special_tokens=True).strip() == e["output"].strip()
                          for g, e in zip(row, examples)] for row in gens], dtype=torch.float64).mean(1)
    assert want[2] >= 0.5 and not torch.all(want == want[0])
    lines = []
    scores = score_adapters(tiny_llama, tiny_tokenizer, bank, examples, perplexity_examples=kshot_examples[4:7],
                            max_new_tokens=6, progress=False, log=lines.append)
    assert torch.equal(scores.accuracy, want)
    assert scores.loss.shape == (4, 3) and torch.allclose(scores.loss, peft_reference[:, 4:7], rtol=0, atol=2e-5)
    meta = scores.meta
    assert (meta["accuracy"], meta["accuracy_auto"], meta["accuracy_examples"], meta["perplexity"]) == \
        ("exact", True, 4, "reasoning")
    assert lines[0] == "perplexity: reasoning on 3 examples"
    assert lines[1].startswith("accuracy: extractor 'exact' (auto: the golds are neither option labels nor")
    plain = score_adapters(tiny_llama, tiny_tokenizer, bank, kshot_examples[4:7], accuracy=None, progress=False,
                           log=lines.append)
    assert plain.accuracy is None and plain.meta["accuracy"] is None and plain.meta["perplexity"] == "vanilla"
    assert lines[2:] == ["perplexity: vanilla on 3 examples (their own outputs; perplexity_examples / --kshot-cot "
                         "give rationales)"]
    assert torch.allclose(plain.loss, scores.loss, rtol=0, atol=1e-6)


def test_accuracy_that_cannot_rank_is_refused_before_the_loss_passes(reference_path, monkeypatch, tiny_llama,
                                                                    tiny_tokenizer, lora_bank_dir, kshot_examples):
    """Free-text golds: auto picks 'exact', and no 2-token generation can equal a whole sentence."""
    free = [dict(e, output="the palms get warm because rubbing them makes friction and heat")
            for e in kshot_examples[:2]]
    monkeypatch.setattr("rocket.scoring.score.adapter_losses", _fail)
    with pytest.raises(ScoringError, match=r"^scoring: accuracy cannot rank the adapters: all 4 tie at 0 because "
                                           r"extractor 'exact' \(auto: .*\) found no generation equal to its gold;"):
        score_adapters(tiny_llama, tiny_tokenizer, LoraBank.load(lora_bank_dir), free, max_new_tokens=2,
                       progress=False, log=lambda *a: None)


def test_golds_are_checked_before_any_pass(reference_path, monkeypatch, tiny_llama, tiny_tokenizer, lora_bank_dir,
                                           tmp_path):
    lines = (DATA / "arc-c_50shot.jsonl").read_text().splitlines()
    lines[16] = lines[16].replace('"output": "2. bubbles', '"output": "bubbles')   # options 1-4, none named
    path = tmp_path / "kshot.jsonl"
    path.write_text("\n".join(lines[:20]) + "\n")
    monkeypatch.setattr("rocket.scoring.score.adapter_losses", _fail)
    monkeypatch.setattr("rocket.runtime.generation.greedy_generate", _fail)
    bank = LoraBank.load(lora_bank_dir)
    with pytest.raises(DataError, match=rf"^{path}:17: the gold output 'bubbles when .* \(options 1234\)$"):
        score_adapters(tiny_llama, tiny_tokenizer, bank, load_examples(path), progress=False)  # auto: not all choice
    with pytest.raises(DataError, match=rf"^{path}:17: .*extractor 'choice' \(options 1234\)$"):
        score_adapters(tiny_llama, tiny_tokenizer, bank, load_examples(path), accuracy="choice", progress=False)
    with pytest.raises(DataError, match=r"^example 0: the gold output 'A. dry palms' has no answer for extractor "
                                        r"'number'$"):
        score_adapters(tiny_llama, tiny_tokenizer, bank, list(load_examples(path)), accuracy="number", progress=False)


@torch.no_grad()
def plain_losses(model, tokenized):
    """Losses [K] of the model alone, one example per forward (float64)."""
    return torch.tensor([float(reference.masked_cross_entropy_per_example(
        model(input_ids=torch.tensor([t.input_ids])).logits, torch.tensor([t.labels]))[0]) for t in tokenized],
        dtype=torch.float64)


@pytest.mark.parametrize("strategy", ["sgmv", "merged"])
def test_the_base_model_is_scored_in_the_same_run(reference_path, strategy, tiny_llama, tiny_tokenizer,
                                                  lora_bank_dir, kshot_examples, peft_reference, tmp_path):
    """Losses of the model alone (the unmerged model / a plain forward) and its greedy accuracy, beside the
    adapters' (unchanged), saved in scores.json's 'base' and read back."""
    bank = LoraBank.load(lora_bank_dir)
    examples = copy.deepcopy(kshot_examples[:4])
    tok = tokenize_examples(examples, tiny_tokenizer)
    prompts = [t.input_ids[:t.prompt_len] for t in tok]
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    base_gens = greedy_generate(tiny_llama, None, prompts, 1, eos, pad, 6, progress=False)[0]
    with multi_lora_model(tiny_llama, bank) as rows:
        gens = greedy_generate(tiny_llama, rows, prompts, len(bank), eos, pad, 6, progress=False)
    for k, gen in ((0, base_gens[0]), (1, base_gens[1]), (2, gens[2][2])):  # the base model / adapter 2 right
        examples[k]["output"] = tiny_tokenizer.decode(gen, skip_special_tokens=True)
    texts = [tiny_tokenizer.decode(g, skip_special_tokens=True).strip() for g in base_gens]
    want_acc = sum(t == e["output"].strip() for t, e in zip(texts, examples)) / 4
    want_loss = plain_losses(tiny_llama, tokenize_examples(examples, tiny_tokenizer))
    scores = score_adapters(tiny_llama, tiny_tokenizer, bank, examples, accuracy="exact", max_new_tokens=6,
                            max_tokens=700, progress=False, strategy=strategy, log=lambda *a: None)
    assert torch.allclose(scores.base_loss, want_loss, rtol=0, atol=2e-5)
    assert scores.base_accuracy == want_acc >= 0.5 and scores.accuracy[2] >= 0.25
    assert scores.base_ppl_sum == pytest.approx(float(torch.exp(want_loss).sum()))
    assert torch.allclose(scores.loss[:, 3], peft_reference[:, 3], rtol=0, atol=2e-5)   # its output unchanged
    assert all(type(m).__name__ != "MultiLoraLinear" for m in tiny_llama.modules())
    scores.save(tmp_path / "scores.json")
    obj = json.loads((tmp_path / "scores.json").read_text())
    assert obj["base"]["accuracy"] == want_acc and obj["base"]["ppl_sum"] == pytest.approx(scores.base_ppl_sum)
    back = Scores.load(tmp_path / "scores.json")
    assert torch.equal(back.base_loss, scores.base_loss) and back.base_accuracy == want_acc
    assert back.names == bank.names   # the base model is no adapter row


def test_scores_without_a_base_row_still_load(tmp_path):
    """scores.json from before the base model was scored: no 'base' field."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"adapters": ["a", "b"], "examples": 2, "loss": [[0.5, 1.0], [0.7, 0.2]],
                                "accuracy": [0.5, 1.0], "meta": {}}))
    old = Scores.load(path)
    assert old.base_loss is None and old.base_accuracy is None and old.base_ppl_sum is None
    assert old.worse_than_base() == [] and old.to_json()["base"] is None
    path.write_text(json.dumps({"adapters": ["a"], "loss": [[0.5, 1.0]], "base": {"loss": [0.1]}}))
    with pytest.raises(DataError, match=r"old\.json: field 'base' must hold 'loss', 2 finite values"):
        Scores.load(path)


def test_worse_than_base_is_a_higher_loss_everywhere_and_no_better_accuracy():
    loss = torch.tensor([[2.0, 3.0], [2.0, 3.0], [1.0, 3.0], [0.5, 0.5], [1.5, 2.5]], dtype=torch.float64)
    names = ["worse", "more_accurate", "equal_once", "better", "worse_no_acc"]
    acc = torch.tensor([0.5, 0.75, 0.0, 1.0, 0.25], dtype=torch.float64)
    base = torch.tensor([1.0, 2.0], dtype=torch.float64)
    scores = Scores(names, loss, acc, base_loss=base, base_accuracy=0.5)
    assert scores.worse_than_base() == ["worse", "worse_no_acc"]   # equal accuracy is no better
    assert scores.below_base() == 1 and Scores(names, loss).below_base() is None   # PPL_R: only "better"
    assert Scores(names, loss, None, base_loss=base).worse_than_base() == ["worse", "more_accurate", "worse_no_acc"]
    assert Scores(names, loss, acc, base_loss=base).worse_than_base() == ["worse", "more_accurate", "worse_no_acc"]


def _zeroed(src, dst):
    """A copy of the peft adapter `src` with every lora_B zero: ΔW = 0 (an untrained adapter)."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(dst / "adapter_model.safetensors"))


def test_adapters_that_cannot_help_are_warned_about(reference_path, tiny_llama, tiny_tokenizer, lora_bank_dir,
                                                    kshot_examples, tmp_path):
    """On K-shot items 2-5, the random adapter attn_r2_rs has a higher loss than the base model on every item,
    all_r8 not; an adapter with B = 0 scores as the base model and is named as untrained only."""
    bank_dir = tmp_path / "bank"
    _zeroed(lora_bank_dir / "qv_r4", bank_dir / "untrained")
    for name in ("all_r8", "attn_r2_rs"):
        (bank_dir / name).symlink_to(lora_bank_dir / name)
    bank = LoraBank.load(bank_dir)
    with pytest.warns(UserWarning) as caught:
        scores = score_adapters(tiny_llama, tiny_tokenizer, bank, kshot_examples[2:6], accuracy=None, progress=False,
                                log=lambda *a: None)
    ours = [str(w.message) for w in caught if str(w.message).startswith("scoring:")]
    assert scores.meta["zero_delta"] == ["untrained"] and scores.worse_than_base() == ["attn_r2_rs"]
    assert torch.allclose(scores.loss[bank.index("untrained")], scores.base_loss, atol=1e-6)
    assert ours == [("scoring: 1 adapter(s) with ΔW = 0 on every module (untrained: they score as the base model, "
                     "and selection sets them aside): untrained"),
                    ("scoring: 1 adapter(s) worse than the base model alone (a higher loss on every example): "
                     "attn_r2_rs")]


def test_heatmap_shows_the_base_model_first(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from rocket.scoring.heatmap import heatmap_rows, save_heatmap

    scores = Scores(["a", "b"], torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64),
                    base_loss=torch.tensor([5.0, 6.0], dtype=torch.float64))
    labels, loss = heatmap_rows(scores)
    assert labels == ["(base model)", "a", "b"] and loss[0].tolist() == [5.0, 6.0] and loss.shape == (3, 2)
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    save_heatmap(scores, tmp_path / "h.png")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["(base model)", "a", "b"]
    assert [line.get_ydata()[0] for line in ax.lines] == [0.5]   # the rule between the base row and the adapters
    labels, _ = heatmap_rows(Scores(["a"], torch.ones(1, 2, dtype=torch.float64)))
    assert labels == ["a"]   # an older scores file: no base row


def test_ppl_r_has_one_format():
    from rocket.data.scores import format_ppl
    assert [format_ppl(v) for v in (10.0, 4614.3049, 24168.0, 1.5e7, float("inf"))] == \
        ["10.00", "4614.30", "24168.00", "1.500e+07", "inf"]


def test_pack_rows_respects_budget_in_order():
    lengths = [30, 100, 55, 100, 7]
    rows = [(a, e) for a in range(3) for e in range(5)]
    batches = pack_rows(rows, lengths, max_tokens=160)
    assert [r for b in batches for r in b] == rows  # order kept: adapter segments stay contiguous
    for b in batches:
        assert sum(lengths[e] for _, e in b) <= 160
    assert pack_rows([(0, 0), (1, 0)], [500], max_tokens=100) == [[(0, 0)], [(1, 0)]]  # a long row goes alone
    assert len(pack_rows(rows, lengths, max_tokens=0)) == len(rows)


def test_bad_inputs(reference_path, tiny_llama, tiny_tokenizer, lora_bank_dir, kshot_examples, tmp_path):
    bank = LoraBank.load(lora_bank_dir)
    with pytest.raises(RocketError, match="no examples"):
        score_adapters(tiny_llama, tiny_tokenizer, bank, [], progress=False)
    long = {"instruction": "x", "input": "", "output": " ".join(["fox"] * 1100)}
    with pytest.raises(DataError, match=r"example 1: \d+ tokens exceed the context of 1024"):
        score_adapters(tiny_llama, tiny_tokenizer, bank, [kshot_examples[0], long], progress=False)
    other = build_llama(tiny_tokenizer, hidden=32, intermediate=48, seed=3)
    make_random_adapter(other, tmp_path / "wide", r=2, target_modules=("q_proj",))
    with pytest.raises(BankError, match=r"adapter 'wide': module '.*q_proj' is 32→32 but the base model's layer"):
        score_adapters(tiny_llama, tiny_tokenizer, LoraBank.load(tmp_path / "wide"), kshot_examples, progress=False)
    with pytest.raises(RocketError, match="unknown accuracy extractor"):
        score_adapters(tiny_llama, tiny_tokenizer, bank, kshot_examples[:1], accuracy="regex", progress=False)
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({bank.names[0]: 0.5}))
    with pytest.raises(RocketError, match=f"no accuracy for adapter '{bank.names[1]}'"):
        score_adapters(tiny_llama, tiny_tokenizer, bank, kshot_examples[:1], accuracy_file=acc, progress=False)


def test_cli_score_writes_json_and_heatmap(reference_path, tiny_model_dir, lora_bank_dir, tmp_path, capsys):
    data = os.path.join(os.path.dirname(__file__), "data", "arc-c_10shot.jsonl")
    bank = LoraBank.load(lora_bank_dir)
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({n: i / 4 for i, n in enumerate(bank.names)}))
    out, png = tmp_path / "out" / "scores.json", tmp_path / "loss.png"
    rc = cli_main(["score", "--base-model", str(tiny_model_dir), "--bank", str(lora_bank_dir), "--data", data,
                   "--out", str(out), "--accuracy-file", str(acc), "--heatmap", str(png), "--no-progress",
                   "--device", "cpu"])
    assert rc == 0
    obj = json.loads(out.read_text())
    assert obj["adapters"] == bank.names and obj["examples"] == 10
    assert len(obj["loss"]) == 4 and len(obj["loss"][0]) == 10 and obj["accuracy"] == [0, 0.25, 0.5, 0.75]
    scores = Scores.load(out)
    assert torch.allclose(scores.ppl_sum, torch.tensor(obj["ppl_sum"], dtype=torch.float64))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = int(scores.ppl_sum.argmin())
    below = int((scores.ppl_sum < scores.base_ppl_sum).sum())
    assert (f"lowest PPL_R: {bank.names[best]} ({scores.ppl_sum[best]:.2f}), base model {scores.base_ppl_sum:.2f} "
            f"({below} of 4 adapters below it); wrote {out}") in capsys.readouterr().out
    assert obj["base"]["accuracy"] is None and len(obj["base"]["loss"]) == 10   # accuracy from a file: none for it
    out2 = tmp_path / "ablation.json"
    rc = cli_main(["score", "--base-model", str(tiny_model_dir), "--bank", str(lora_bank_dir), "--data", data,
                   "--out", str(out2), "--no-accuracy", "--strategy", "merged", "--max-tokens", "2000",
                   "--no-progress", "--device", "cpu"])
    obj2 = json.loads(out2.read_text())
    assert rc == 0 and obj2["meta"]["strategy"] == "merged" and obj2["meta"]["accuracy"] is None
    assert obj2["accuracy"] is None
    assert torch.allclose(torch.tensor(obj2["loss"]), torch.tensor(obj["loss"]), atol=2e-5)
    capsys.readouterr()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rc = cli_main(["score", "--base-model", str(tiny_model_dir), "--bank", str(lora_bank_dir), "--data", str(empty),
                   "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert rc == 2 and "is empty" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_score_with_a_tokenizer_directory(reference_path, tiny_model_dir, tiny_tokenizer, lora_bank_dir,
                                              tmp_path, capsys):
    """A model directory saved without its tokenizer files scores with --tokenizer DIR, as the whole directory
    does; without --tokenizer the one-line error names the option."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json",
                                                                         "chat_template.jinja"))
    tokenizer = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer)
    data = str(DATA / "arc-c_10shot.jsonl")
    base = ["score", "--bank", str(lora_bank_dir), "--data", data, "--no-accuracy", "--no-progress", "--device", "cpu"]
    assert cli_main(base + ["--base-model", str(model), "--out", str(tmp_path / "none.json")]) == 2
    assert "give its directory with --tokenizer" in capsys.readouterr().err
    assert cli_main(base + ["--base-model", str(model), "--tokenizer", str(tokenizer),
                            "--out", str(tmp_path / "split.json")]) == 0
    assert cli_main(base + ["--base-model", str(tiny_model_dir), "--out", str(tmp_path / "whole.json")]) == 0
    split, whole = Scores.load(tmp_path / "split.json"), Scores.load(tmp_path / "whole.json")
    assert torch.equal(split.loss, whole.loss) and torch.equal(split.base_loss, whole.base_loss)
    assert split.meta["tokenizer"] == str(tokenizer) and whole.meta["tokenizer"] is None


def test_cli_score_accuracy_by_default_golds_first_and_cot(reference_path, monkeypatch, tiny_model_dir,
                                                          lora_bank_dir, kshot_examples, tmp_path, capsys):
    base = ["score", "--base-model", str(tiny_model_dir), "--bank", str(lora_bank_dir), "--no-progress",
            "--device", "cpu"]
    free = tmp_path / "free.jsonl"
    write_jsonl(free, [dict(e, output="the palms get warm because rubbing makes heat") for e in kshot_examples[:2]])
    # on by default: free-text golds → 'exact', and no 2-token generation equals a sentence → refused
    assert cli_main(base + ["--data", str(free), "--out", str(tmp_path / "a.json"), "--max-new-tokens", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bars
    assert len(err) == 1 and "all 4 tie at 0 because extractor 'exact' (auto:" in err[0]
    assert not (tmp_path / "a.json").exists()
    # an unreadable gold is named by file and line before the model is even loaded
    rows = (DATA / "arc-c_50shot.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows[:16] + [rows[16].replace('"output": "2. ', '"output": "')]) + "\n")
    with monkeypatch.context() as patch:
        patch.setattr("rocket.scoring.cli.load_base", _fail)
        assert cli_main(base + ["--data", str(bad), "--out", str(tmp_path / "b.json"), "--accuracy", "choice"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:17: the gold output 'bubbles when acid" in err[0] and "(options 1234)" in err[0]
    # --data-cot: reasoning perplexity on the rationale set (here without accuracy)
    cot = tmp_path / "cot.jsonl"
    write_jsonl(cot, [dict(e, output=e["output"] + " because it is so") for e in kshot_examples[:3]])
    out = tmp_path / "c.json"
    assert cli_main(base + ["--data", str(free), "--kshot-cot", str(cot), "--out", str(out), "--no-accuracy"]) == 0
    obj = json.loads(out.read_text())
    assert obj["examples"] == 3 and obj["meta"]["perplexity"] == "reasoning" and obj["meta"]["data_cot"] == str(cot)
    assert "perplexity: reasoning on 3 examples" in capsys.readouterr().out


def _sharded_worker(rank, world, rendezvous, model_dir, bank_dir, data, out):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rocket.data.examples import load_examples
    os.environ["TRITON_INTERPRET"] = "0"
    store = dist.FileStore(rendezvous, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    scores = score_adapters(model, tok, LoraBank.load(bank_dir), load_examples(data), max_new_tokens=4,
                            progress=False, log=lambda *a: None)
    if rank == 0:
        scores.save(out)
    # A rank once aborted in CI with "terminate called without an active exception": a C++ thread torn
    # down mid-flight, i.e. gloo's teardown racing its peer or interpreter exit. So teardown starts only once
    # every rank has said "done" through the file store (no sockets), and the worker leaves without running
    # C++ destructors at exit.
    store.add("done", 1)
    while store.add("done", 0) < world:
        time.sleep(0.01)
    dist.destroy_process_group()
    os._exit(0)


def test_adapters_sharded_over_processes(reference_path, tiny_model_dir, lora_bank_dir, kshot_examples, tmp_path):
    """Losses and accuracy (adapter 1, generated on rank 1, gets two golds right) and the base model's row equal
    one process's."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    bank = LoraBank.load(lora_bank_dir)
    examples = copy.deepcopy(kshot_examples[:4])
    prompts = [t.input_ids[:t.prompt_len] for t in tokenize_examples(examples, tok)]
    with multi_lora_model(model, bank) as rows:
        gens = greedy_generate(model, rows, prompts, len(bank), tok.eos_token_id, tok.pad_token_id, 4, progress=False)
    for k in (0, 1):
        examples[k]["output"] = tok.decode(gens[1][k], skip_special_tokens=True)
    data, out = tmp_path / "kshot.jsonl", tmp_path / "sharded.json"
    write_jsonl(data, examples)
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "rdv"), str(tiny_model_dir), str(lora_bank_dir),
                                    str(data), str(out)), nprocs=2, join=True)
    single = score_adapters(model, tok, bank, load_examples(data), max_new_tokens=4, progress=False,
                            distributed=False, log=lambda *a: None)
    sharded = Scores.load(out)
    assert torch.allclose(sharded.loss, single.loss, atol=1e-6)
    assert single.accuracy[1] >= 0.5 and torch.equal(sharded.accuracy, single.accuracy)
    # the base model's row: scored on rank 0 alone, then all-reduced (both ranks take part)
    assert torch.allclose(sharded.base_loss, single.base_loss, atol=1e-6)
    assert sharded.base_accuracy == single.base_accuracy is not None


def test_auto_strategy_merges_from_the_measured_token_count():
    from rocket.errors import ScoringError
    from rocket.scoring.score import MERGE_FROM_TOKENS, choose_strategy
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # 10 examples of a 7B-shape run (~3,300 tokens per adapter): merging measured 1.46x SGMV there
    assert choose_strategy("auto", cuda, 3300) == "merged"
    assert choose_strategy("auto", cuda, MERGE_FROM_TOKENS - 1) == "sgmv"
    assert choose_strategy("auto", cpu, 10 ** 6) == "sgmv"  # no merge pays on the CPU's slow passes
    assert choose_strategy("sgmv", cuda, 10 ** 6) == "sgmv" and choose_strategy("merged", cpu, 1) == "merged"
    with pytest.raises(ScoringError, match="unknown strategy 'fast'"):
        choose_strategy("fast", cuda, 1)
