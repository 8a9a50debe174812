"""README.md, executed: every command of its ```bash blocks and its ```python block run as written,
in README order, on a tiny world laid out under the names the README uses (CPU, no network), so
the README cannot drift from the CLI and the API."""
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import rocket.cli
from rocket.data.examples import load_examples, write_jsonl
from rocket.data.tokenize import tokenize_example
from rocket.demo import fit
from rocket.tiny import LLAMA_TARGETS

README = Path(__file__).parents[1] / "README.md"
DATA = Path(__file__).parent / "data"

# Lines of the bash blocks that do not run here, by prefix, and why; every other line must be a
# `rocket` command, and it runs.
SKIPPED = {
    "python3 -m venv": "creates an environment",
    "pip install": "installs packages (no network)",
    "python -m pytest": "the test suite itself",
    "torchrun": "launches several GPU processes",
    "deepspeed": "launches several GPU processes",
    "rocket demo": "tests/test_demo.py runs the demo (at its test size)",
}
# The world's size: what the commands' cost grows with (greedy generations for accuracy, training).
KSHOT, POOL = 5, 64


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def commands(block: str) -> list[list[str]]:
    """The command lines of a bash block: continuations joined, comments dropped, split as the shell does."""
    lines = (shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines())
    return [words for words in lines if words]


def train_arc_adapter(base: Path, out: Path) -> None:
    """A LoRA of the demo's base model trained on the ARC questions outside the 10-shot file: its
    greedy answers start with an option ("A. …")."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kshot = {e["instruction"] for e in load_examples(DATA / "arc-c_10shot.jsonl")}
    questions = [e for e in load_examples(DATA / "arc-c_50shot.jsonl") if e["instruction"] not in kshot]
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_TARGETS),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    fit(peft_model, [tokenize_example(e, tokenizer, "alpaca") for e in questions], 80, 1e-2, 8, 0, "arc", False)
    peft_model.save_pretrained(str(out))


@pytest.fixture
def readme_dir(on_idle_cores, demo_world, tmp_path):
    """The README's example (ARC-Challenge, `--template alpaca --accuracy choice`) under the names it
    uses: kshot.jsonl the first questions of the ARC 10-shot set; BASE (and INSTRUCT_DIR) the demo's base model with a
    context long enough for ARC questions and their rationales (its rotary positions go beyond the
    256 it was built with); adapters/ the demo's bank plus a LoRA trained on other ARC questions, so
    that some greedy generations name an option; pool.jsonl part of the demo's open pool; test.jsonl
    the rest of the 10-shot file, held out."""
    world = demo_world / "world"
    base = shutil.copytree(world / "base_model", tmp_path / "BASE")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    (tmp_path / "INSTRUCT_DIR").symlink_to(base)
    write_jsonl(tmp_path / "kshot.jsonl", load_examples(DATA / "arc-c_10shot.jsonl")[:KSHOT])
    write_jsonl(tmp_path / "test.jsonl", load_examples(DATA / "arc-c_10shot.jsonl")[KSHOT:])   # held out
    write_jsonl(tmp_path / "pool.jsonl", load_examples(world / "pool.jsonl")[:POOL])
    bank = tmp_path / "adapters"
    bank.mkdir()
    for adapter in (world / "bank").iterdir():
        (bank / adapter.name).symlink_to(adapter)
    train_arc_adapter(base, bank / "arc")
    return tmp_path


def test_readme_runs(on_idle_cores, readme_dir, monkeypatch):
    # the commands run the plain-torch CPU paths, not the Triton interpreter conftest turns on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.chdir(readme_dir)
    text = README.read_text(encoding="utf-8")
    ran, skipped = [], set()
    for block in fenced(text, "bash"):
        for words in commands(block):
            line = " ".join(words)
            prefix = next((p for p in SKIPPED if line.startswith(p)), None)
            if prefix is not None:
                skipped.add(prefix)
                continue
            assert words[0] == "rocket", f"README command neither run nor skipped (SKIPPED): {line}"
            argv = words[1:] + ([] if "--device" in words else ["--device", "cpu"])
            try:
                status = rocket.cli.main(argv)
            except SystemExit as e:   # argparse: an unknown or missing flag
                status = e.code
            assert status == 0, line
            ran.append(words[1])
    assert skipped == set(SKIPPED), f"SKIPPED entries that match no README line: {set(SKIPPED) - skipped}"
    assert {"run", "rationale", "score", "select", "augment", "train"} <= set(ran), ran

    # the run-directory listing names every entry `rocket run` wrote
    out = re.search(r"^rocket run .*?--out (\S+)", text, re.MULTILINE | re.DOTALL).group(1)
    listing = re.search(rf"^# {re.escape(out)}:(.*?)^```", text, re.MULTILINE | re.DOTALL).group(1)
    for entry in Path(out).iterdir():
        name = entry.name + ("/" if entry.is_dir() else "")
        assert re.search(rf"(?<![\w.]){re.escape(name)}", listing), f"{out}/{name} missing from the README's listing"

    snippets = fenced(text, "python")
    assert snippets
    for code in snippets:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
