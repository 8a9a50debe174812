"""Shared fixtures: a tiny random-init Llama with a locally trained tokenizer, random peft adapters
of mixed ranks/alphas/targets, and the `gpu` marker (skipped without CUDA)."""
import copy
import os
from contextlib import contextmanager
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in the interpreter (small shapes); set before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rocket.data.examples import load_examples  # noqa: E402
from tests.helpers import BANK_SPEC  # noqa: E402
from rocket.tiny import build_llama, build_tokenizer, make_random_adapter  # noqa: E402

DATA = Path(__file__).parent / "data"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# name, rank, alpha, target modules, rsLoRA: mixed on purpose


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kshot_examples():
    return load_examples(DATA / "arc-c_10shot.jsonl")


@pytest.fixture(scope="session")
def tiny_tokenizer(kshot_examples):
    texts = [e["instruction"] + " " + e["output"] for e in kshot_examples]
    return build_tokenizer(texts * 4 + ["The quick brown fox jumps over the lazy dog. 0123456789"], 384)


@pytest.fixture(scope="session")
def _tiny_llama(tiny_tokenizer):
    return build_llama(tiny_tokenizer, seed=1234)


@pytest.fixture
def tiny_llama(_tiny_llama):
    """A fresh copy per test, so a test may modify or wrap it freely."""
    return copy.deepcopy(_tiny_llama)


@pytest.fixture(scope="session")
def tiny_model_dir(_tiny_llama, tiny_tokenizer, tmp_path_factory):
    """The tiny Llama and its tokenizer saved as an HF model directory (for CLI tests)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lora_bank_dir(_tiny_llama, tmp_path_factory):
    """A directory of peft adapters of mixed ranks, alphas, target modules and rsLoRA."""
    root = tmp_path_factory.mktemp("bank")
    for seed, (name, r, alpha, targets, rslora) in enumerate(BANK_SPEC):
        make_random_adapter(_tiny_llama, root / name, r=r, alpha=alpha, target_modules=targets,
                            use_rslora=rslora, seed=100 + seed)
    return root


@contextmanager
def idle_threads():
    """torch threads on the cores idle now only, as `rocket demo` runs (rocket.demo.idle_cores): a
    thread on a core that another process holds only spins, and slows tiny models many times over."""
    from rocket.demo import idle_cores

    before = torch.get_num_threads()
    torch.set_num_threads(min(before, idle_cores()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def on_idle_cores():
    with idle_threads():
        yield


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    """ROOT with the `rocket demo` world at the test size in ROOT/world (rocket.demo.build_world,
    seed 0), built once per session: run_demo(ROOT, "small") reuses it."""
    from rocket.demo import build_world

    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")   # the plain-torch CPU paths, as `rocket demo` runs
    try:
        with idle_threads():
            build_world(root / "world", "small", seed=0, progress=False)
    finally:
        mp.undo()
    return root
