"""Bad inputs, each answered by one line that names its field, file or step (docs/design.md §2.2):
`rocket CMD: error: …` and exit code 2 on the command line, one RocketError line from the API.

Every row of CASES is an input and the error it must give; add a row for each new check. A row's
action is `cli(...)` (a command line) or `call(...)` (an API call); `{tmp}` (a fresh directory),
`{model}` (the tiny model directory), `{bank}` (its adapter bank) and `{data}` (K-shot data) are
filled in from the fixtures."""
import contextlib
import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rocket.errors import RocketError

DATA = Path(__file__).parent / "data" / "arc-c_10shot.jsonl"


@dataclass
class Inputs:
    tmp: Path
    model: Path
    bank: Path
    data: Path

    def fill(self, arg: str) -> str:
        return arg.format(tmp=self.tmp, model=self.model, bank=self.bank, data=self.data)


def cli(*argv: str, before=None):
    """`rocket ARGV` (after `before(inputs)` has prepared its files) must exit with 2, its last
    stderr line being the only `rocket CMD: error: …` line; returns that line."""
    def run(inputs: Inputs) -> str:
        from rocket.cli import main
        if before is not None:
            before(inputs)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([inputs.fill(a) for a in argv])
        text, prefix = err.getvalue().rstrip("\n"), f"rocket {argv[0]}: error: "
        assert rc == 2 and text.count(prefix) == 1 and text.splitlines()[-1].startswith(prefix), (rc, text)
        return text.splitlines()[-1]
    return run


def call(fn):
    """fn(inputs) must raise a RocketError whose message is one line; returns the message."""
    def run(inputs: Inputs) -> str:
        with pytest.raises(RocketError) as e:
            fn(inputs)
        assert "\n" not in str(e.value), str(e.value)
        return str(e.value)
    return run


def train_cli(*flags: str, before=None, base_model="{tmp}/no-model"):
    """`rocket train FLAGS` whose inputs do not exist: the error in FLAGS (or in the base model)
    must come before anything else is read."""
    return cli("train", "--base-model", base_model, "--data", "{tmp}/no-data.jsonl", "--experts", "{tmp}/no-bank",
               "--out", "{tmp}/out", "--device", "cpu", "--backend", "torch", "--no-progress", *flags, before=before)


def real_train_cli(*flags: str, before=None):
    """`rocket train FLAGS` on the tiny model, its bank and the K-shot data, output in {tmp}/out."""
    return cli("train", "--base-model", "{model}", "--data", "{data}", "--experts", "{bank}", "--out", "{tmp}/out",
               "--device", "cpu", "--backend", "torch", "--no-progress", *flags, before=before)


def score_cli(*flags: str, before=None, base_model="{model}"):
    """`rocket score FLAGS` on the tiny bank and the K-shot data, accuracy off: the error in FLAGS (or
    in the base model) must come before any scoring (no scores file is written)."""
    run = cli("score", "--base-model", base_model, "--bank", "{bank}", "--data", "{data}", "--out",
              "{tmp}/scores.json", "--no-accuracy", "--device", "cpu", "--no-progress", *flags, before=before)

    def checked(inputs: Inputs) -> str:
        line = run(inputs)
        assert not (inputs.tmp / "scores.json").exists()
        return line
    return checked


def run_cli(*flags: str):
    """`rocket run FLAGS` on the tiny model and bank, the K-shot data as pool too: the error must come
    before any stage runs (the run directory stays empty)."""
    run = cli("run", "--base-model", "{model}", "--bank", "{bank}", "--kshot", "{data}", "--pool", "{data}",
              "--out", "{tmp}/run", "--no-accuracy", "--device", "cpu", "--no-progress", *flags)

    def checked(inputs: Inputs) -> str:
        line = run(inputs)
        assert not (inputs.tmp / "run").exists(), "a stage ran before the options were checked"
        return line
    return checked


def config(**fields):
    def make(inputs):
        from rocket.training.config import TrainConfig
        TrainConfig(**fields)
    return call(make)


def train_api(**options):
    """rocket.train on the tiny model, its bank and the K-shot data with these options."""
    def run(inputs):
        from rocket import train
        train(inputs.model, inputs.data, inputs.bank, inputs.tmp / "out", device="cpu", progress=False, **options)
    return call(run)


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-7])


def damaged_checkpoint(name: str, damage=truncate):
    """{tmp}/out/checkpoints/step-0000001, whole but for `damage` done to its file `name`."""
    def make(inputs):
        from safetensors.torch import save_file
        from rocket.moe.state import CONFIG_KEY
        ckpt = inputs.tmp / "out" / "checkpoints" / "step-0000001"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text('{"step": 1, "losses": [2.5]}\n')
        save_file({"x.lora_A": torch.zeros(2, 4)}, str(ckpt / "moe.safetensors"), metadata={CONFIG_KEY: "{}"})
        save_file({"x.lora_A.exp_avg": torch.zeros(2, 4)}, str(ckpt / "optimizer.safetensors"))
        damage(ckpt / name)
    return make


def safetensors_without_metadata(path: Path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(path))


def model_copy(*drop: str, files: dict[str, str] | None = None):
    """{tmp}/m: the tiny model directory without the files matching `drop`, `files` (name: text) written."""
    def make(inputs):
        shutil.copytree(inputs.model, inputs.tmp / "m", ignore=shutil.ignore_patterns(*drop))
        for name, text in (files or {}).items():
            (inputs.tmp / "m" / name).write_text(text)
        return inputs.tmp / "m"
    return make


def load(what: str, make):
    """load_model / load_tokenizer of the directory that `make(inputs)` returns."""
    def run(inputs):
        from rocket.modeling import load_model, load_tokenizer
        if what == "model":
            load_model(make(inputs), torch.device("cpu"))
        else:
            load_tokenizer(make(inputs))
    return call(run)


def mkdir(rel: str):
    return lambda inputs: (inputs.tmp / rel).mkdir(parents=True)


def touch(rel: str):
    return lambda inputs: (inputs.tmp / rel).write_text("not a directory\n")


def write(rel: str, data: bytes | str):
    """{tmp}/rel with this content."""
    def make(inputs):
        path = inputs.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return make


def dedup_of(rows):
    def run(inputs):
        from rocket import dedup
        dedup(torch.tensor(rows))
    return run


def saved_moe(damage=None):
    """load_moe({model}, {tmp}/moe), a mixture of two experts on the tiny model saved there by
    save_moe, `damage(directory)` done to it first (no mixture at all without `damage`)."""
    def run(inputs):
        from rocket.adapters.bank import LoraBank
        from rocket.modeling import load_model
        from rocket.moe import inject_lora_moe, load_moe, save_moe
        if damage is not None:
            base = load_model(inputs.model, torch.device("cpu"))
            save_moe(inject_lora_moe(base, LoraBank.load(inputs.bank), [0, 1], top_k=1), inputs.tmp / "moe")
            damage(inputs.tmp / "moe")
        load_moe(inputs.model, inputs.tmp / "moe", device="cpu")
    return call(run)


def moe_config_edit(edit):
    """Rewrites the rocket_moe_config.json of a saved mixture as edit(config) returns it."""
    def damage(directory: Path):
        import json
        file = directory / "rocket_moe_config.json"
        file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    return damage


TOKENIZER = ("tokenizer*", "special_tokens_map.json", "chat_template.jinja")

CASES = [
    # training hyperparameters (TrainConfig), refused before any input is read
    pytest.param(train_cli("--lr", "inf"), r"lr must be a finite number > 0, got inf$", id="train --lr inf"),
    pytest.param(train_cli("--lr", "nan"), r"lr must be a finite number > 0, got nan$", id="train --lr nan"),
    pytest.param(train_cli("--lr", "0"), r"lr must be a finite number > 0, got 0\.0$", id="train --lr 0"),
    pytest.param(train_cli("--weight-decay", "-5"), r"weight_decay must be a finite number ≥ 0, got -5\.0$",
                 id="train --weight-decay -5"),
    pytest.param(train_cli("--weight-decay", "inf"), r"weight_decay must be a finite number ≥ 0, got inf$",
                 id="train --weight-decay inf"),
    pytest.param(train_cli("--max-grad-norm", "nan"), r"max_grad_norm must be a finite number ≥ 0 .*, got nan$",
                 id="train --max-grad-norm nan"),
    pytest.param(train_cli("--max-grad-norm", "-1"), r"max_grad_norm must be a finite number ≥ 0 .*, got -1\.0$",
                 id="train --max-grad-norm -1"),
    pytest.param(train_cli("--warmup-ratio", "-1"), r"warmup_ratio must be a finite number in \[0, 1\), got -1\.0$",
                 id="train --warmup-ratio -1"),
    pytest.param(train_cli("--warmup-ratio", "1"), r"warmup_ratio must be a finite number in \[0, 1\), got 1\.0$",
                 id="train --warmup-ratio 1"),
    pytest.param(train_cli("--lora-dropout", "1"), r"lora_dropout must be a finite number in \[0, 1\), got 1\.0$",
                 id="train --lora-dropout 1"),
    pytest.param(train_cli("--lora-dropout", "nan"), r"lora_dropout must be a finite number in \[0, 1\), got nan$",
                 id="train --lora-dropout nan"),
    pytest.param(train_cli("--aux-loss-coef", "-0.5"), r"aux_loss_coef must be a finite number ≥ 0 .*, got -0\.5$",
                 id="train --aux-loss-coef -0.5"),
    pytest.param(train_cli("--aux-loss-coef", "inf"), r"aux_loss_coef must be a finite number ≥ 0 .*, got inf$",
                 id="train --aux-loss-coef inf"),
    pytest.param(train_cli("--save-steps", "-1"), r"save_steps must be an integer ≥ 0, got -1$",
                 id="train --save-steps -1"),
    pytest.param(train_cli("--save-total-limit", "0"), r"save_total_limit must be an integer ≥ 1, got 0$",
                 id="train --save-total-limit 0"),
    pytest.param(train_cli("--save-total-limit", "-3"), r"save_total_limit must be an integer ≥ 1, got -3$",
                 id="train --save-total-limit -3"),
    pytest.param(train_cli("--epochs", "0"), r"epochs must be an integer ≥ 1, got 0$", id="train --epochs 0"),
    pytest.param(train_cli("--max-steps", "0"), r"max_steps must be an integer ≥ 1 \(or None\), got 0$",
                 id="train --max-steps 0"),
    pytest.param(config(lr="1e-4"), r"^lr must be a finite number > 0, got '1e-4'$", id="TrainConfig lr str"),
    pytest.param(config(lr=True), r"^lr must be a finite number > 0, got True$", id="TrainConfig lr bool"),
    pytest.param(config(epochs=True), r"^epochs must be an integer ≥ 1, got True$", id="TrainConfig epochs bool"),
    pytest.param(config(batch_size=2.0), r"^batch_size must be an integer ≥ 1, got 2\.0$",
                 id="TrainConfig batch_size float"),
    pytest.param(config(max_steps=True), r"^max_steps must be an integer ≥ 1 \(or None\), got True$",
                 id="TrainConfig max_steps bool"),
    pytest.param(config(seed="0"), r"^seed must be an integer, got '0'$", id="TrainConfig seed str"),
    pytest.param(config(train_router_only="no"), r"^train_router_only must be True or False, got 'no'$",
                 id="TrainConfig train_router_only str"),
    pytest.param(train_api(lr=float("inf")), r"^lr must be a finite number > 0, got inf$", id="train() lr inf"),
    # base model directories, checked before any long work
    pytest.param(train_cli(before=mkdir("empty"), base_model="{tmp}/empty"),
                 r"empty: an empty directory, not a Hugging Face model directory$", id="train empty base model"),
    pytest.param(train_cli(base_model="{bank}/qv_r4"),
                 r"qv_r4: looks like a peft adapter \(adapter_config\.json, no config\.json\), not a base model",
                 id="train adapter as base model"),
    pytest.param(cli("score", "--base-model", "{bank}/qv_r4", "--bank", "{bank}", "--data", "{data}",
                     "--out", "{tmp}/scores.json", "--device", "cpu", "--no-progress"),
                 r"qv_r4: looks like a peft adapter", id="score adapter as base model"),
    pytest.param(train_cli(before=model_copy(*TOKENIZER), base_model="{tmp}/m"),
                 r"m: no tokenizer files \(tokenizer\.json, tokenizer\.model, or vocab\.json \+ merges\.txt\); "
                 r"save the tokenizer with the model, or give its directory with --tokenizer$",
                 id="train base model without tokenizer"),
    pytest.param(score_cli(before=model_copy(*TOKENIZER), base_model="{tmp}/m"),
                 r"m: no tokenizer files .*; save the tokenizer with the model, or give its directory with "
                 r"--tokenizer$",
                 id="score base model without tokenizer"),
    # --tokenizer DIR (a model saved without its tokenizer), checked before any long work
    pytest.param(train_cli("--tokenizer", "{tmp}/nowhere", base_model="{model}"),
                 r"--tokenizer .*nowhere: no such directory$", id="train --tokenizer missing"),
    pytest.param(score_cli("--tokenizer", "{bank}/qv_r4"),
                 r"--tokenizer .*qv_r4: no tokenizer files \(tokenizer\.json, tokenizer\.model, or vocab\.json \+ "
                 r"merges\.txt\)$", id="score --tokenizer without tokenizer files"),
    pytest.param(score_cli("--tokenizer", "{tmp}/t", before=model_copy(*TOKENIZER), base_model="{tmp}/m"),
                 r"--tokenizer .*/t: no such directory$", id="score --tokenizer missing, model without tokenizer"),
    pytest.param(score_cli("--tokenizer", "{tmp}/m", before=model_copy(*TOKENIZER, files={"vocab.json": "{}"})),
                 r"--tokenizer .*m: incomplete tokenizer: vocab\.json without merges\.txt$",
                 id="score --tokenizer incomplete"),
    pytest.param(run_cli("--tokenizer", "{tmp}/nowhere"), r"--tokenizer .*nowhere: no such directory$",
                 id="run --tokenizer missing"),
    pytest.param(cli("eval", "--base-model", "{model}", "--moe", "{tmp}/moe", "--bank", "{bank}", "--data", "{data}",
                     "--tokenizer", "{tmp}/nowhere", "--no-accuracy", "--device", "cpu", "--no-progress"),
                 r"--tokenizer .*nowhere: no such directory$", id="eval --tokenizer missing"),
    pytest.param(cli("rationale", "--model", "{model}", "--kshot", "{data}", "--out", "{tmp}/cot.jsonl",
                     "--tokenizer", "{tmp}/nowhere", "--device", "cpu", "--no-progress"),
                 r"--tokenizer .*nowhere: no such directory$", id="rationale --tokenizer missing"),
    pytest.param(load("tokenizer", model_copy(*TOKENIZER, files={"vocab.json": "{}"})),
                 r"m: incomplete tokenizer: vocab\.json without merges\.txt$", id="tokenizer vocab without merges"),
    pytest.param(load("model", model_copy("model.safetensors")), r"m: no model weights \(none of model\.safetensors",
                 id="base model without weights"),
    pytest.param(load("model", model_copy(files={"config.json": '{"hidden_size": 8}'})),
                 r"m/config\.json: no model_type or architectures, not a transformers model config$",
                 id="config.json without model_type"),
    pytest.param(load("model", model_copy(files={"config.json": '{"model_type": "llama",'})),
                 r"m/config\.json: malformed JSON \(", id="config.json malformed"),
    # checkpoints and outputs
    pytest.param(real_train_cli("--resume", before=damaged_checkpoint("optimizer.safetensors")),
                 r"out/checkpoints: no complete checkpoint left \(newest: .*step-0000001/optimizer\.safetensors: "
                 r"truncated or corrupt", id="train --resume, no complete checkpoint"),
    pytest.param(real_train_cli("--resume", "{tmp}/out/checkpoints/step-0000001",
                                before=damaged_checkpoint("trainer_state.json")),
                 r"step-0000001/trainer_state\.json:1: malformed JSON", id="train --resume CKPT, truncated state"),
    pytest.param(real_train_cli("--resume", "{tmp}/out/checkpoints/step-0000001",
                                before=damaged_checkpoint("moe.safetensors")),
                 r"step-0000001/moe\.safetensors: truncated or corrupt", id="train --resume CKPT, truncated moe"),
    pytest.param(real_train_cli("--resume", "{tmp}/out/checkpoints/step-0000001",
                                before=damaged_checkpoint("optimizer.safetensors", Path.unlink)),
                 r"step-0000001/optimizer\.safetensors: missing$", id="train --resume CKPT, no optimizer file"),
    pytest.param(real_train_cli("--resume", "{tmp}/out/checkpoints/step-0000001", before=damaged_checkpoint(
                     "trainer_state.json", lambda p: p.write_bytes(b"\xff\xfe{\x00"))),
                 r"step-0000001/trainer_state\.json:1: malformed JSON", id="train --resume CKPT, binary state"),
    pytest.param(real_train_cli("--resume", "{tmp}/out/checkpoints/step-0000001", before=damaged_checkpoint(
                     "trainer_state.json", lambda p: p.write_text('{"losses": []}'))),
                 r"step-0000001/trainer_state\.json: no step \(not a rocket trainer state\)$",
                 id="train --resume CKPT, state without step"),
    pytest.param(real_train_cli("--resume", "{tmp}/out/checkpoints/step-0000001",
                                before=damaged_checkpoint("moe.safetensors", safetensors_without_metadata)),
                 r"step-0000001/moe\.safetensors: not a rocket MoE state \(no 'rocket_moe_config' metadata\)$",
                 id="train --resume CKPT, moe without its config"),
    pytest.param(real_train_cli("--resume", "{tmp}/nowhere"), r"nowhere: no such checkpoint directory$",
                 id="train --resume CKPT, no such directory"),
    # trained mixtures (load_moe)
    pytest.param(saved_moe(), r"moe: no such MoE state file$", id="load_moe, no such path"),
    pytest.param(saved_moe(lambda d: [p.unlink() for p in d.iterdir()]),
                 r"moe: no rocket_moe_config\.json or moe\.safetensors \(expected a rocket train output",
                 id="load_moe, empty directory"),
    pytest.param(saved_moe(lambda d: (d / "moe.safetensors").unlink()),
                 r"moe/moe\.safetensors: no such MoE state file \(its rocket_moe_config\.json is there\)$",
                 id="load_moe, config without weights"),
    pytest.param(saved_moe(lambda d: (d / "rocket_moe_config.json").write_text('{"top_k": 1,')),
                 r"moe/rocket_moe_config\.json:1: malformed JSON", id="load_moe, malformed config"),
    pytest.param(saved_moe(moe_config_edit(lambda c: [c])),
                 r"moe/rocket_moe_config\.json: expected a JSON object, got a list$", id="load_moe, config a list"),
    pytest.param(saved_moe(moe_config_edit(lambda c: {k: v for k, v in c.items() if k != "top_k"})),
                 r"moe/rocket_moe_config\.json: no field 'top_k'$", id="load_moe, config without top_k"),
    pytest.param(saved_moe(moe_config_edit(lambda c: {**c, "base_model": "llama"})),
                 r"moe: field 'base_model' must hold the base model's 'path' and 'fingerprint'$",
                 id="load_moe, base_model not an object"),
    pytest.param(cli("train", "--base-model", "{model}", "--data", "{data}", "--experts", "{bank}",
                     "--out", "{tmp}/file/out", "--device", "cpu", "--backend", "torch", "--no-progress",
                     before=touch("file")),
                 r"file/out: cannot write \(Not a directory\)$", id="train --out under a file"),
    # outputs that would overwrite an input or another output, refused before any work
    pytest.param(cli("augment", "--pool", "{data}", "--kshot", "{data}", "--out", "{tmp}/aug.jsonl",
                     "--report", "{tmp}/aug.jsonl"),
                 r"--report .*aug\.jsonl: the same file as --out; it would be overwritten$", id="augment --report = --out"),
    pytest.param(cli("augment", "--pool", "{tmp}/pool.jsonl", "--kshot", "{data}", "--out", "{data}",
                     before=write("pool.jsonl", '{"instruction": "a", "output": "b"}\n')),
                 r"--out .*arc-c_10shot\.jsonl: the same file as --kshot; it would be overwritten$",
                 id="augment --out = --kshot"),
    pytest.param(cli("score", "--base-model", "{model}", "--bank", "{bank}", "--data", "{data}",
                     "--out", "{tmp}/s.json", "--heatmap", "{tmp}/../{tmp.name}/s.json", "--no-progress"),
                 r"--heatmap .*s\.json: the same file as --out; it would be overwritten$", id="score --heatmap = --out"),
    pytest.param(cli("select", "--scores", "{tmp}/s.json", "--bank", "{bank}", "--out", "{tmp}/s.json",
                     before=write("s.json", '{"adapters": ["a"], "loss": [[0.1]]}')),
                 r"--out .*s\.json: the same file as --scores; it would be overwritten$", id="select --out = --scores"),
    # data files: encodings and shapes
    pytest.param(cli("augment", "--pool", "{tmp}/pool.jsonl", "--kshot", "{data}", "--out", "{tmp}/aug.jsonl",
                     before=write("pool.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9"}')),
                 r"pool\.jsonl:2: not UTF-8 text \(byte 0xe9\)$", id="augment pool not UTF-8"),
    pytest.param(cli("augment", "--pool", "{tmp}/one.json", "--kshot", "{data}", "--out", "{tmp}/aug.jsonl",
                     before=write("one.json", '{\n  "instruction": "a",\n  "output": "b"\n}\n')),
                 r"one\.json: one JSON object spread over several lines; expected JSONL", id="augment pretty JSON object"),
    pytest.param(cli("select", "--scores", "{tmp}/s.json", "--bank", "{bank}", "--out", "{tmp}/e.txt",
                     before=write("s.json", '{"adapters": ["a", "b"], "loss": [[0.1, 0.2], [0.3]]}')),
                 r"s\.json: 'loss' row 1 \('b'\) has 1 values, row 0 has 2$", id="select ragged scores"),
    # embeddings with no direction
    pytest.param(call(dedup_of([[1.0, 0.0], [float("nan"), 1.0], [1.0, 0.0]])), r"^dedup: row 1 has non-finite values",
                 id="dedup NaN row"),
    pytest.param(call(dedup_of([[1.0, 0.0], [0.0, 0.0]])), r"^dedup: row 1 is all zeros", id="dedup zero row"),
    # rocket run: every stage's options checked before the first stage runs (nothing written)
    pytest.param(run_cli("--top-k", "9"), r"--top-k 9 > --n-experts 4: a token cannot use more experts", id="run --top-k 9"),
    pytest.param(run_cli("--threshold", "2"), r"--threshold must be a cosine in \[-1, 1\], got 2\.0$", id="run --threshold 2"),
    pytest.param(run_cli("--n-experts", "9", "--top-m", "9"), r"--n-experts 9: the bank .* has only \d adapters$",
                 id="run --n-experts above the bank"),
    pytest.param(run_cli("--lr", "-1"), r"lr must be a finite number > 0, got -1\.0$", id="run --lr -1"),
    pytest.param(run_cli("--template", "nope"), r"unknown template 'nope'", id="run --template unknown"),
]


@pytest.fixture
def inputs(tmp_path, tiny_model_dir, lora_bank_dir):
    return Inputs(tmp_path, tiny_model_dir, lora_bank_dir, DATA)


@pytest.mark.parametrize("action, expected", CASES)
def test_bad_input_is_one_line(action, expected, inputs):
    message = action(inputs)
    assert re.search(expected, message), message
