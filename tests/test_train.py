"""Stage 4 training on the CPU with the tiny Llama: batching, errors, learning, router-only mode,
exact resume, DeepSpeed (when installed) against the plain torch loop, the CLI and load_moe, and
durability: non-finite losses and weights, damaged checkpoints, failed writes."""
import copy
import json
import logging
import re
import shutil
import signal

import pytest
import torch

from rocket.data.examples import DataError
from rocket.data.tokenize import pad_batch, tokenize_examples
from rocket.moe.inject import moe_layers
from rocket.moe.state import moe_state_dict
from rocket.training.config import TrainConfig, TrainError
from rocket.training.batches import length_grouped_batches, prepare_examples, rank_batches, token_loss_sum
from rocket.moe.state import load_moe
from rocket.training.loop import train

try:
    import deepspeed  # noqa: F401
    HAVE_DS = True
except ImportError:
    HAVE_DS = False


@pytest.fixture(autouse=True)
def _cpu_reference(monkeypatch):
    # The CPU path of a real run is the torch reference (kernels.use_triton); the interpreted Triton
    # kernels are tested on their own in test_moe.py and would only slow these runs down.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def examples(kshot_examples):
    return kshot_examples


def _run(model, tok, examples, bank, out, **kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    kw.setdefault("cutoff", 512)
    return train(model, examples, bank, out, tokenizer=tok, **kw)


def _data_loss(model, tok, examples) -> float:
    """Mean output-token loss of the model over all examples (eval mode, one example at a time)."""
    toks = tokenize_examples(examples, tok, "alpaca")
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(len(toks)):
            b = pad_batch([toks[i]], tok.pad_token_id, "cpu")
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(token_loss_sum(logits, b["labels"]))
            n += int((b["labels"][:, 1:] != -100).sum())
    return total / n


# --------------------------------------------------------------------------- batching
def test_length_grouped_batches_cover_every_example_once_and_pad_little():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 400, (1003,), generator=gen).tolist()
    b0 = length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert sorted(i for b in b0 for i in b) == list(range(1003))
    assert all(1 <= len(b) <= 8 for b in b0)
    assert b0 == length_grouped_batches(lengths, 8, seed=3, epoch=0)          # a pure function of (seed, epoch)
    assert b0 != length_grouped_batches(lengths, 8, seed=3, epoch=1)
    assert max(lengths[i] for i in b0[0]) == max(lengths)                      # longest batch first

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    plain = length_grouped_batches(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert sorted(i for b in plain for i in b) == list(range(1003))
    assert padding(b0) < 0.1 * padding(plain)


def test_rank_batches_give_every_rank_the_same_number_of_steps():
    batches = [[i] for i in range(7)]
    shares = [rank_batches(batches, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    seen = sorted(i for s in shares for b in s for i in b)
    assert set(seen) == set(range(7)) and len(seen) == 9   # two batches repeat to even the ranks out


# --------------------------------------------------------------------------- bad data
def test_no_examples_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(DataError, match="no training examples"):
        prepare_examples([], tiny_tokenizer, TrainConfig())


def test_all_examples_over_the_cutoff_is_a_clear_error(tiny_tokenizer, examples):
    with pytest.raises(DataError, match=r"all 10 examples are longer than the cutoff of 16 tokens"):
        prepare_examples(examples, tiny_tokenizer, TrainConfig(cutoff=16), where="aug.jsonl")


def test_examples_over_the_cutoff_are_dropped_with_a_warning(tiny_tokenizer, examples, caplog):
    lengths = sorted(len(t.input_ids) for t in tokenize_examples(examples, tiny_tokenizer, "alpaca"))
    with caplog.at_level(logging.WARNING, logger="rocket.train"):
        kept = prepare_examples(examples, tiny_tokenizer, TrainConfig(cutoff=lengths[4]))
    assert len(kept) == sum(n <= lengths[4] for n in lengths)
    assert "dropped" in caplog.text


def test_bad_config_is_refused():
    with pytest.raises(TrainError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TrainError, match="overflow"):
        TrainConfig(overflow="cut")


# --------------------------------------------------------------------------- defaults
def test_defaults_are_the_papers_recipe_and_the_clis_follow_them():
    """TrainConfig's defaults are the paper's recipe; `rocket train` takes every default from it and
    `rocket run` states no train default of its own that differs."""
    import argparse
    import re
    from dataclasses import fields
    from rocket.pipeline import cli as run_cli
    from rocket.training import cli as train_cli
    d = TrainConfig()
    assert (d.batch_size, d.grad_accum, d.lr, d.epochs, d.cutoff, d.lora_dropout, d.aux_loss_coef) == \
        (2, 16, 5e-5, 5, 1024, 0.05, 0.0)
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = vars(parser.parse_args(["--base-model", "m", "--data", "d", "--experts", "e", "--out", "o"]))
    shared = [f.name for f in fields(TrainConfig) if f.name in args]
    assert len(shared) >= 20
    for name in shared:
        assert args[name] == getattr(d, name), name
    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    stated = {a.dest: re.search(r"\(default: ([^)]+)\)", a.help)[1] for a in parser._actions
              if a.dest in run_cli.TRAIN_FLAGS and hasattr(d, a.dest)}
    assert set(stated) == {"epochs", "lr", "batch_size", "grad_accum", "top_k", "cutoff", "save_steps"}
    for name, value in stated.items():
        assert value.startswith("rocket train's") or value == str(getattr(d, name)), name


def test_cuda_graphs_are_refused_where_they_cannot_run_before_the_model_loads(tiny_tokenizer, examples,
                                                                             lora_bank_dir, tmp_path, monkeypatch):
    def run(**kw):  # a model directory that does not exist: the check must come first
        _run(tmp_path / "no-model", tiny_tokenizer, examples, lora_bank_dir, tmp_path / "run", cuda_graphs=True, **kw)

    with pytest.raises(TrainError, match="^cuda_graphs must be True or False, got 'yes'$"):
        TrainConfig(cuda_graphs="yes")
    with pytest.raises(TrainError, match="^--cuda-graphs needs a CUDA device, got cpu$"):
        run()
    in_torch_loop = "^--cuda-graphs runs in the plain torch loop"
    with pytest.raises(TrainError, match=in_torch_loop):
        run(backend="deepspeed")
    with pytest.raises(TrainError, match=in_torch_loop):
        run(backend="auto", deepspeed_config="zero2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainError, match=in_torch_loop):
        run(backend="auto")
    assert not (tmp_path / "run").exists()


def test_config_accepts_the_edges_of_every_range():
    # tests/test_bad_inputs.py holds the values just outside them
    cfg = TrainConfig(max_grad_norm=0, warmup_ratio=0, weight_decay=0, lora_dropout=0, aux_loss_coef=0, save_steps=0,
                      save_total_limit=1, lr=1, max_steps=1, seed=-1)
    assert cfg.max_grad_norm == 0 and cfg.save_total_limit == 1
    assert TrainConfig(warmup_ratio=0.999, lora_dropout=0.999).lora_dropout == 0.999


# --------------------------------------------------------------------------- learning
def test_loss_decreases_and_load_moe_restores_the_trained_model(tiny_llama, tiny_tokenizer, examples,
                                                                lora_bank_dir, tmp_path):
    base = copy.deepcopy(tiny_llama)
    res = _run(tiny_llama, tiny_tokenizer, examples, lora_bank_dir, tmp_path / "run", epochs=8, lr=2e-2,
               batch_size=2, grad_accum=2, warmup_ratio=0.0)
    assert res.steps == 8 * 3 and len(res.losses) == res.steps and res.backend == "torch"
    trained = _data_loss(res.model, tiny_tokenizer, examples)
    fresh = copy.deepcopy(base)
    from rocket.moe.inject import inject_lora_moe
    from rocket.adapters.bank import LoraBank
    bank = LoraBank.load(lora_bank_dir)
    inject_lora_moe(fresh, bank, list(range(len(bank))), top_k=2)
    before = _data_loss(fresh, tiny_tokenizer, examples)
    assert trained < before - 0.3, (before, trained)
    assert sum(res.losses[-3:]) / 3 < res.losses[0] - 0.3

    loaded = load_moe(copy.deepcopy(base), tmp_path / "run", device="cpu")
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, res.model.eval()(input_ids=ids).logits)
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert cfg["steps"] == res.steps and cfg["experts"] == bank.names
    assert json.loads((tmp_path / "run" / "losses.json").read_text()) == res.losses


def test_router_only_changes_routers_and_leaves_experts(tiny_llama, tiny_tokenizer, examples, lora_bank_dir,
                                                        tmp_path):
    from rocket.adapters.bank import LoraBank
    from rocket.moe.inject import inject_lora_moe
    bank = LoraBank.load(lora_bank_dir)
    init = moe_state_dict(inject_lora_moe(copy.deepcopy(tiny_llama), bank, list(range(len(bank))), top_k=2))
    res = _run(tiny_llama, tiny_tokenizer, examples, bank, tmp_path / "r", max_steps=3, lr=1e-2,
               train_router_only=True, batch_size=4, grad_accum=1)
    after = moe_state_dict(res.model)
    assert after.keys() == init.keys() and len(moe_layers(res.model)) > 0
    for key in init:
        if key.endswith((".lora_A", ".lora_B", ".scaling")):
            assert torch.equal(after[key].float(), init[key].float()), key
        else:
            assert not torch.allclose(after[key].float(), init[key].float()), key


# --------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


def _kill_after(step):
    def on_step(info):
        if info.step == step:
            raise _Killed
    return on_step


@pytest.mark.parametrize("backend", ["torch", pytest.param("deepspeed", marks=pytest.mark.skipif(
    not HAVE_DS, reason="deepspeed is not installed"))])
def test_resumed_run_reproduces_the_uninterrupted_trajectory(backend, tiny_llama, tiny_tokenizer, examples,
                                                             lora_bank_dir, tmp_path):
    # dropout, accumulation with a short last step, and an epoch boundary between kill and end
    kw = dict(backend=backend, epochs=2, lr=1e-2, batch_size=3, grad_accum=2, lora_dropout=0.1, save_steps=1,
              deepspeed_config="zero2")
    full = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "full", **kw)
    assert full.steps == 4
    with pytest.raises(_Killed):
        _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "cut",
             on_step=_kill_after(1), **kw)
    with pytest.raises(TrainError, match="pass --resume"):
        _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "cut", **kw)
    with pytest.raises(TrainError, match="batch_size=3"):
        _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "cut", resume=True,
             **{**kw, "batch_size": 2})
    resumed = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "cut",
                   resume=True, **kw)
    assert resumed.losses == full.losses          # exactly, step by step
    a, b = moe_state_dict(full.model), moe_state_dict(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(set(full.losses)) == len(full.losses)  # the trajectory moves


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_4d_mask_of_captured_batches_gives_the_logits_of_the_padding_mask(attention, tiny_llama, tiny_tokenizer,
                                                                          examples):
    """Captured micro-batches hand the model a 4-D mask built on the device (transformers reads a 2-D
    mask on the host): every position, pads included, gets the logits of the 2-D mask's forward."""
    from rocket.training.graphs import attention_mask_4d
    tiny_llama.config._attn_implementation = attention
    toks = tokenize_examples(examples[:3], tiny_tokenizer, "alpaca")
    b = pad_batch(toks, tiny_tokenizer.pad_token_id, "cpu", multiple=16)
    assert not b["attention_mask"].all()  # some rows are padded
    with torch.no_grad():
        want = tiny_llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = tiny_llama(input_ids=b["input_ids"], use_cache=False,
                         attention_mask=attention_mask_4d(b["attention_mask"], torch.float32)).logits
        causal_only = tiny_llama(input_ids=b["input_ids"], use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (causal_only - want).abs().max() > 1e-3  # the pads' rows: the padding mask matters there


@pytest.mark.gpu
def test_gpu_captured_micro_batches_train_like_the_eager_loop(tiny_llama, tiny_tokenizer, examples, lora_bank_dir,
                                                              tmp_path, caplog, recwarn):
    """--cuda-graphs end to end: one graph per micro-batch shape, and the losses of the eager loop
    (bf16), with accumulation, a short last step and the balancing loss on."""
    kw = dict(device="cuda", epochs=2, lr=1e-2, batch_size=4, grad_accum=2, lora_dropout=0.0, aux_loss_coef=0.01,
              warmup_ratio=0.0)  # 10 examples: micro-batches of 4, 4, 2; steps of two micro-batches, then one
    eager = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "eager", **kw)
    with caplog.at_level(logging.INFO, logger="rocket.train"):
        graphed = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "graphed",
                       cuda_graphs=True, **kw)
    toks = prepare_examples(examples, tiny_tokenizer, TrainConfig(cutoff=512))
    lengths = [len(t.input_ids) for t in toks]
    shapes = {tuple(pad_batch([toks[i] for i in idx], 0, multiple=16)["input_ids"].shape)
              for epoch in range(2) for idx in length_grouped_batches(lengths, 4, 0, epoch)}
    captured = [m for m in caplog.messages if m.startswith("cuda graphs: captured micro-batch shape")]
    assert len(captured) == len(shapes) > 1 and graphed.steps == eager.steps == 4
    assert graphed.losses == pytest.approx(eager.losses, rel=5e-3)
    assert len(set(graphed.losses)) == len(graphed.losses)
    # every captured backward on its capture stream (autograd warns when it accumulates on another)
    assert not [w for w in recwarn if "AccumulateGrad" in str(w.message)]


@pytest.mark.gpu
def test_gpu_captured_micro_batches_accumulate_the_eager_gradients(tiny_llama, tiny_tokenizer, examples,
                                                                   lora_bank_dir):
    """Gradient by gradient, in float32 (bf16 rounding and AdamW would hide small errors), the
    balancing loss on (it counts the pads' routing too): two batches of one shape replay one graph
    with their own tokens and masks and add up, the step's zeroing keeps the tensors the graph
    writes, and a batch of another shape gets its own graph."""
    from rocket.training.engines import TorchEngine
    toks = tokenize_examples(examples, tiny_tokenizer, "alpaca")
    pad = tiny_tokenizer.pad_token_id
    long = [pad_batch(toks[i:i + 2], pad, "cuda", multiple=512) for i in (0, 2)]  # one shape, other tokens
    short = pad_batch(toks[4:7], pad, "cuda", multiple=16)
    assert long[0]["input_ids"].shape == long[1]["input_ids"].shape != short["input_ids"].shape
    weights = torch.tensor([1 / 300, 0.01 / 2], device="cuda")
    engines = {}
    for graphs in (False, True):
        model = _injected(tiny_llama.to("cuda"), lora_bank_dir, load_balancing=True)
        engines[graphs] = TorchEngine(model, TrainConfig(cuda_graphs=graphs, aux_loss_coef=0.01),
                                      torch.device("cuda"))

    def grads(graphs, batches):
        engine = engines[graphs]
        parts = [float(engine.forward_backward(b, True, weights)) for b in batches]
        out = {n: p.grad.clone() for n, p in engine.params}
        engine.optimizer.zero_grad(set_to_none=not graphs)  # as the engine's step does
        return parts, out

    for batches in (long, [short], long[:1]):
        (want_parts, want), (got_parts, got) = grads(False, batches), grads(True, batches)
        assert got_parts == pytest.approx(want_parts, rel=1e-5)
        assert sum(g.norm() > 0 for g in want.values()) >= len(want) // 2
        for name in want:
            assert (got[name] - want[name]).norm() <= 1e-3 * want[name].norm() + 1e-9, name
    assert set(engines[True].captured.graphs) == {tuple(long[0]["input_ids"].shape), tuple(short["input_ids"].shape)}


def _injected(model, bank_dir, **kw):
    from rocket.adapters.bank import LoraBank
    from rocket.moe.inject import inject_lora_moe
    model = copy.deepcopy(model)
    bank = LoraBank.load(bank_dir)
    inject_lora_moe(model, bank, list(range(len(bank))), top_k=2, **kw)
    return model


def test_auto_resume_continues_only_its_own_run(tiny_llama, tiny_tokenizer, examples, lora_bank_dir, tmp_path):
    """resume="auto" (what `rocket run` uses): the checkpoints of the same run are continued exactly;
    those of other data are set aside and training starts from step 0."""
    kw = dict(epochs=2, lr=1e-2, batch_size=3, grad_accum=2, save_steps=1)
    full = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "full", **kw)
    with pytest.raises(_Killed):
        _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "cut",
             on_step=_kill_after(2), **kw)
    steps = []
    resumed = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "cut",
                   resume="auto", on_step=lambda info: steps.append(info.step), **kw)
    assert steps == [3, 4] and resumed.losses == full.losses
    other = examples[:-1] + [dict(examples[-1], output=examples[-1]["output"] + " Indeed.")]  # other data
    with pytest.raises(_Killed):
        _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "mixed",
             on_step=_kill_after(2), **kw)
    steps = []
    fresh = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, other, lora_bank_dir, tmp_path / "mixed",
                 resume="auto", on_step=lambda info: steps.append(info.step), **kw)
    assert steps[0] == 1 and fresh.steps == len(steps)  # a fresh start, neither a resume nor an error
    with pytest.raises(TrainError, match="other training data or experts"):
        _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "mixed", resume=True,
             **kw)


@pytest.mark.skipif(not HAVE_DS, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_follows_the_torch_loop(stage, tiny_llama, tiny_tokenizer, examples, lora_bank_dir, tmp_path):
    from rocket.training.engines import load_ds_config
    if stage == "zero3":  # partition every tensor, as a big model's are: gathering is exercised
        stage = load_ds_config("zero3")
        stage["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    kw = dict(max_steps=2, lr=1e-2, batch_size=4, grad_accum=2)
    ref = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "t", **kw)
    ds = _run(tiny_llama, tiny_tokenizer, examples, lora_bank_dir, tmp_path / "d", backend="deepspeed",
              deepspeed_config=stage, **kw)
    assert ds.backend == "deepspeed"
    assert ds.losses == pytest.approx(ref.losses, rel=1e-5)
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "t" / "moe.safetensors")), load_file(str(tmp_path / "d" / "moe.safetensors"))
    assert a.keys() == b.keys()
    # ZeRO reduces gradients in its own order; Adam magnifies those last-bit differences where a
    # gradient is near 0, so compare at a small fraction of the updates (lr 1e-2 × 2 steps)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)


# --------------------------------------------------------------------------- CLI
def test_cli_trains_and_reports_bad_data(tiny_model_dir, lora_bank_dir, examples, tmp_path, capsys):
    from rocket.cli import main
    from rocket.data.examples import write_jsonl
    manifest = tmp_path / "experts.txt"
    manifest.write_text("".join(f"{p}\n" for p in sorted(lora_bank_dir.iterdir())))
    data = tmp_path / "aug.jsonl"
    write_jsonl(data, examples)
    out = tmp_path / "out"
    rc = main(["train", "--base_model", str(tiny_model_dir), "--data_path", str(data), "--experts", str(manifest),
               "--output_dir", str(out), "--max-steps", "2", "--micro_batch_size", "4",
               "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
               "--cutoff_len", "512", "--top-k", "1", "--backend", "torch", "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert (out / "moe.safetensors").is_file() and (out / "checkpoints").is_dir()
    assert "trained 2 steps (torch)" in capsys.readouterr().out
    assert json.loads((out / "train_config.json").read_text())["config"]["top_k"] == 1

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["train", "--base-model", str(tiny_model_dir), "--experts", str(manifest), "--backend", "torch",
            "--device", "cpu"]
    assert main(args + ["--data", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "empty.jsonl: file is empty" in capsys.readouterr().err
    assert main(args + ["--data", str(data), "--out", str(tmp_path / "o3"), "--cutoff", "16"]) == 2
    assert "longer than the cutoff of 16 tokens" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_load_balancing_loss_reaches_the_routers(tiny_llama, tiny_tokenizer, examples, lora_bank_dir, tmp_path):
    kw = dict(max_steps=1, lr=1e-2, batch_size=4, grad_accum=1, warmup_ratio=0.0)
    plain = _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "a", **kw)
    aux = _run(tiny_llama, tiny_tokenizer, examples, lora_bank_dir, tmp_path / "b", aux_loss_coef=1.0, **kw)
    assert aux.losses == plain.losses  # the logged loss is the language-model loss alone
    a, b = moe_state_dict(plain.model), moe_state_dict(aux.model)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("router.weight"))


def test_auto_backend_is_torch_for_one_process_and_deepspeed_with_a_config(tiny_llama, tiny_tokenizer, examples,
                                                                           lora_bank_dir, tmp_path):
    kw = dict(backend="auto", max_steps=1, batch_size=4, grad_accum=1)
    assert _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples, lora_bank_dir, tmp_path / "a",
                **kw).backend == "torch"
    with_config = _run(tiny_llama, tiny_tokenizer, examples, lora_bank_dir, tmp_path / "b", deepspeed_config="zero2",
                       **kw)
    assert with_config.backend == ("deepspeed" if HAVE_DS else "torch")


# --------------------------------------------------------------------------- durability (docs/design.md §7)
# One short run: 6 examples, 2 per step, a checkpoint after every step, the newest 2 kept.
SHORT = dict(max_steps=3, lr=1e-2, batch_size=2, save_steps=1, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def short_run(_tiny_llama, tiny_tokenizer, kshot_examples, lora_bank_dir, tmp_path_factory):
    """The uninterrupted short run: its output directory and losses."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        out = tmp_path_factory.mktemp("short") / "out"
        res = _run(copy.deepcopy(_tiny_llama), tiny_tokenizer, kshot_examples[:6], lora_bank_dir, out, **SHORT)
    assert res.steps == 3 and [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000002",
                                                                                            "step-0000003"]
    return out, res.losses


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_nonfinite_loss_stops_before_the_optimizer_step(tiny_llama, tiny_tokenizer, examples, lora_bank_dir,
                                                        tmp_path):
    out, kept = tmp_path / "out", {}

    def poison_after_step_2(info):  # a base weight turns to inf: the next loss is NaN
        if info.step == 2:
            kept.update(_files(out / "checkpoints"))
            with torch.no_grad():
                tiny_llama.model.norm.weight[0] = float("inf")
    with pytest.raises(TrainError) as e:
        _run(tiny_llama, tiny_tokenizer, examples[:6], lora_bank_dir, out, on_step=poison_after_step_2,
             **{**SHORT, "max_steps": 4})
    assert str(e.value) == (f"step 3: the loss is not finite (nan); the last good checkpoint is "
                            f"{out / 'checkpoints' / 'step-0000002'}")
    assert _files(out / "checkpoints") == kept and not (out / "moe.safetensors").exists()
    from safetensors.torch import load_file
    saved = load_file(str(out / "checkpoints" / "step-0000002" / "moe.safetensors"))
    now = moe_state_dict(tiny_llama)
    assert all(torch.equal(now[k], saved[k]) for k in saved)  # the optimizer step of step 3 was not applied


@pytest.mark.parametrize("backend", ["torch", pytest.param("deepspeed", marks=pytest.mark.skipif(
    not HAVE_DS, reason="deepspeed is not installed"))])
def test_nonfinite_weights_are_never_written(backend, tiny_llama, tiny_tokenizer, examples, lora_bank_dir, tmp_path):
    out, kept = tmp_path / "out", {}

    def poison_after_the_last_step(info):  # after its checkpoint, before the final write
        if info.step == 3:
            kept.update(_files(out))
            with torch.no_grad():
                next(iter(moe_layers(tiny_llama).values())).lora_B.view(-1)[0] = float("nan")
    with pytest.raises(TrainError, match=r"^step 3: the trained weights are not finite \(\S+\.lora_B\); the last good "
                                         r"checkpoint is \S+/checkpoints/step-0000003$"):
        _run(tiny_llama, tiny_tokenizer, examples[:6], lora_bank_dir, out, backend=backend, deepspeed_config="zero2",
             on_step=poison_after_the_last_step, **SHORT)
    assert _files(out) == kept and not (out / "moe.safetensors").exists()


@pytest.mark.parametrize("name, damage, reason", [
    ("optimizer.safetensors", lambda b: b[: len(b) // 2], r"optimizer\.safetensors: truncated or corrupt"),
    ("moe.safetensors", lambda b: b[:-1], r"moe\.safetensors: truncated or corrupt"),
    ("trainer_state.json", lambda b: b[: len(b) // 2], r"trainer_state\.json:\d+: malformed JSON"),
], ids=["optimizer", "moe", "trainer_state"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(name, damage, reason, short_run, tiny_llama,
                                                            tiny_tokenizer, examples, lora_bank_dir, tmp_path, caplog):
    done, losses = short_run
    out = tmp_path / "out"
    shutil.copytree(done, out)
    bad = out / "checkpoints" / "step-0000003" / name
    bad.write_bytes(damage(bad.read_bytes()))
    steps = []
    with caplog.at_level(logging.WARNING, logger="rocket.train"):
        res = _run(tiny_llama, tiny_tokenizer, examples[:6], lora_bank_dir, out, resume=True,
                   on_step=lambda info: steps.append(info.step), **SHORT)
    assert re.search(rf"skipping step-0000003: {re.escape(str(bad.parent))}/{reason}", caplog.text), caplog.text
    assert steps == [3] and res.losses == losses  # step 3 again from step 2: the same step
    assert _files(out) == _files(done)


class _FileSizeLimit:
    """From `limit(nbytes)` on, this process's writes past nbytes fail for real (EFBIG, as writes to a
    full disk fail with ENOSPC) until `close()`."""

    def __init__(self):
        self.saved = None

    def limit(self, nbytes: int):
        import resource
        self.saved = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, self.saved[1][1]))

    def close(self):
        if self.saved is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, self.saved[1])
            signal.signal(signal.SIGXFSZ, self.saved[0])


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
@pytest.mark.parametrize("at_step, message", [
    # the checkpoint of step 3: its moe.safetensors still fits, its optimizer.safetensors (twice the size) does not
    (2, r"^step 3: cannot write the checkpoint \S+/step-0000003 \(optimizer\.safetensors: .*File too large.*\); "
        r"the earlier checkpoints are intact$"),
    # the final moe.safetensors, after the last checkpoint
    (3, r"^\S+/out/moe\.safetensors: cannot write \(.*File too large.*\); the last good checkpoint is "
        r"\S+/step-0000003$"),
], ids=["checkpoint", "final output"])
def test_failed_write_names_the_file_and_leaves_the_checkpoints(at_step, message, short_run, tiny_llama,
                                                                tiny_tokenizer, examples, lora_bank_dir, tmp_path):
    done, losses = short_run
    out, fsize = tmp_path / "out", _FileSizeLimit()
    moe_bytes = (done / "checkpoints" / "step-0000003" / "moe.safetensors").stat().st_size

    def fill_the_disk(info):
        if info.step == at_step:
            fsize.limit(moe_bytes if at_step == 2 else 1024)
    try:
        with pytest.raises(TrainError, match=message):
            _run(copy.deepcopy(tiny_llama), tiny_tokenizer, examples[:6], lora_bank_dir, out,
                 on_step=fill_the_disk, **SHORT)
    finally:
        fsize.close()
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    kept = ["step-0000001", "step-0000002"] if at_step == 2 else ["step-0000002", "step-0000003"]
    assert names == ["checkpoints"] + [f"checkpoints/{c}{f}" for c in kept
                                       for f in ("", "/moe.safetensors", "/optimizer.safetensors",
                                                 "/trainer_state.json")]  # no temporary file or directory left
    steps = []
    res = _run(tiny_llama, tiny_tokenizer, examples[:6], lora_bank_dir, out, resume=True,
               on_step=lambda info: steps.append(info.step), **SHORT)
    assert steps == ([3] if at_step == 2 else []) and res.losses == losses
    assert _files(out) == _files(done)


# --------------------------------------------------------------------------- trained-MoE directory (docs/design.md §3)
@pytest.fixture(scope="module")
def dir_run(tiny_model_dir, kshot_examples, lora_bank_dir, tmp_path_factory):
    """A short run on the tiny base model given by its directory: the output directory and the trained model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        out = tmp_path_factory.mktemp("dir_run") / "out"
        res = train(str(tiny_model_dir), kshot_examples, lora_bank_dir, out, backend="torch", device="cpu",
                    progress=False, cutoff=512, max_steps=2, lr=1e-2, batch_size=4, grad_accum=1)
    return out, res.model.eval()


IDS = torch.tensor([[1, 5, 9, 40, 77, 3]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _base_copy(tiny_model_dir, tmp_path, name="base"):
    dst = tmp_path / name
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_output_is_a_trained_moe_directory_that_loads_onto_its_base(dir_run, tiny_model_dir, tiny_tokenizer,
                                                                    lora_bank_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer
    from rocket.moe.state import CONFIG_KEY
    out, trained = dir_run
    assert {p.name for p in out.iterdir()} >= {"moe.safetensors", "rocket_moe_config.json", "tokenizer.json",
                                               "tokenizer_config.json", "train_config.json", "losses.json",
                                               "checkpoints"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file or directory left
    cfg = json.loads((out / "rocket_moe_config.json").read_text())
    with safe_open(str(out / "moe.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[CONFIG_KEY]) == cfg
    names = sorted(p.name for p in lora_bank_dir.iterdir())
    assert cfg["base_model"]["path"] == str(tiny_model_dir)
    assert set(cfg["base_model"]["fingerprint"]) == {"config", "shapes", "samples"}
    assert cfg["experts"] == names and cfg["expert_dirs"] == [str(lora_bank_dir / n) for n in names]
    assert (cfg["top_k"], cfg["n_experts"], cfg["rank"], cfg["dropout"], cfg["router_std"]) == (2, 4, 16, 0.05, 0.01)
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(cfg["modules"]) == 14 and cfg["rocket_version"] == __import__("rocket").__version__
    text = "The quick brown fox"
    assert AutoTokenizer.from_pretrained(str(out))(text).input_ids == tiny_tokenizer(text).input_ids
    want = _logits(trained)
    assert torch.equal(_logits(load_moe(tiny_model_dir, out, device="cpu")), want)
    # the same base elsewhere (another machine's copy) and in bfloat16: the same fingerprint
    assert torch.equal(_logits(load_moe(_base_copy(tiny_model_dir, out.parent, "copy"), out, device="cpu")), want)
    assert load_moe(tiny_model_dir, out, device="cpu", dtype="bfloat16").dtype == torch.bfloat16


def _perturbed(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    base = _base_copy(tiny_model_dir, tmp_path, "perturbed")
    weights = load_file(str(base / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


def _other_config(tiny_model_dir, tmp_path):
    base = _base_copy(tiny_model_dir, tmp_path, "other_config")
    config = json.loads((base / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.mark.parametrize("make, differs", [(_perturbed, "weights"), (_other_config, "config.json")],
                         ids=["one perturbed weight", "another config"])
def test_load_moe_refuses_another_base_unless_forced(make, differs, dir_run, tiny_model_dir, tmp_path):
    from rocket.errors import MoEError
    out, trained = dir_run
    other = make(tiny_model_dir, tmp_path)
    message = f"{out}: trained on base model {tiny_model_dir} but given {other}, which differs in {differs}"
    with pytest.raises(MoEError) as e:
        load_moe(other, out, device="cpu")
    assert str(e.value) == f"{message}; pass force_base=True (--force-base) to load it anyway"
    with pytest.warns(UserWarning, match=re.escape(f"{message}; loaded anyway (force_base)")):
        forced = load_moe(other, out, device="cpu", force_base=True)
    saved = moe_state_dict(trained)
    assert all(torch.equal(v, saved[k]) for k, v in moe_state_dict(forced).items())


def test_the_earlier_single_file_output_still_loads(dir_run, tiny_model_dir, tmp_path):
    """A run's output before the directory form: moe.safetensors alone, its config in the metadata, no
    base-model fingerprint."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from rocket.moe.state import CONFIG_KEY
    out, trained = dir_run
    with safe_open(str(out / "moe.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        cfg = json.loads(f.metadata()[CONFIG_KEY])
    earlier = {k: cfg[k] for k in ("experts", "modules", "top_k", "n_experts", "dropout", "router_std", "seed",
                                   "load_balancing", "train_router_only")}
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "moe.safetensors"), metadata={CONFIG_KEY: json.dumps(earlier)})
    for source in (tmp_path / "old", tmp_path / "old" / "moe.safetensors"):
        with pytest.warns(UserWarning, match="saved without the base model's fingerprint"):
            loaded = load_moe(tiny_model_dir, source, device="cpu")
        assert torch.equal(_logits(loaded), _logits(trained))


def test_select_out_is_what_train_experts_reads(tiny_model_dir, lora_bank_dir, examples, tmp_path, capsys):
    """`rocket select --out experts.txt` writes adapter directories; `rocket train --experts` reads them, and
    the reference implementation's manifests of .../adapter_model.bin files too."""
    from safetensors.torch import load_file
    from rocket.adapters.bank import LoraBank
    from rocket.cli import main
    from rocket.data.examples import write_jsonl
    from rocket.data.scores import Scores
    names = LoraBank.load(lora_bank_dir).names
    Scores(names, torch.linspace(0.5, 2.0, 5 * len(names), dtype=torch.float64).reshape(len(names), 5)).save(
        tmp_path / "scores.json")
    manifest = tmp_path / "experts.txt"
    assert main(["select", "--scores", str(tmp_path / "scores.json"), "--bank", str(lora_bank_dir), "--n-experts",
                 "2", "--top-m", "3", "--out", str(manifest), "--no-plot", "--no-progress", "--device", "cpu"]) == 0
    header, *dirs = manifest.read_text().splitlines()
    chosen = json.loads(manifest.with_suffix(".json").read_text())["experts"]
    assert header.startswith("# ") and dirs == [str(lora_bank_dir / n) for n in chosen]
    # the reference implementation's manifest: a weights file per line, .bin
    bin_manifest, bin_dirs = tmp_path / "reference.txt", []
    for name in chosen:
        d = tmp_path / "bin" / name
        shutil.copytree(lora_bank_dir / name, d)
        torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
        (d / "adapter_model.safetensors").unlink()
        bin_dirs.append(str(d))
    bin_manifest.write_text("".join(f"{d}/adapter_model.bin\n" for d in bin_dirs))
    data = tmp_path / "aug.jsonl"
    write_jsonl(data, examples)
    for experts, expected in ((manifest, dirs), (bin_manifest, bin_dirs)):
        out = tmp_path / experts.stem
        assert main(["train", "--base-model", str(tiny_model_dir), "--data", str(data), "--experts", str(experts),
                     "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--grad-accum", "1", "--cutoff",
                     "512", "--backend", "torch", "--no-progress", "--device", "cpu"]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        cfg = json.loads((out / "rocket_moe_config.json").read_text())
        assert cfg["experts"] == chosen and cfg["expert_dirs"] == expected


@pytest.mark.skipif(not HAVE_DS, reason="deepspeed is not installed")
def test_deepspeed_logs_go_to_stderr_never_stdout():
    import subprocess
    import sys
    code = "from rocket.training.engines import import_deepspeed; import_deepspeed().utils.logger.warning('probe')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "" and "probe" in out.stderr, (out.stdout, out.stderr[-500:])
