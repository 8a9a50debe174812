"""Benchmark cases shared by several bench files: input builders, shapes and step functions.

The pytest suites (bench/test_*.py) and the device scripts (bench/profile_moe.py,
bench/train_multigpu.py, bench/dedup_tune.py) build their inputs here, so that a device script
measures the very cases a suite checks. Nothing here needs a GPU to import.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.peers import lora_moe_dense_einsum, lora_moe_grouped, lora_moe_loop, lora_single


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 on the CPU; inf where out holds a NaN or Inf (never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- LoRA-MoE layer
def lora_moe_inputs(T, d_in, d_out, E, r, dtype, device, seed=0):
    """One layer's tensors: x [T, d_in], frozen W, b, experts A [E, r, d_in], B [E, d_out, r],
    scalings s [E] (float32), router G [E, d_in], and the output gradient gy [T, d_out]."""
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype).to(device)  # noqa: E731
    return dict(x=t(T, d_in), W=t(d_out, d_in, scale=d_in ** -0.5), b=t(d_out), A=t(E, r, d_in, scale=d_in ** -0.5),
                B=t(E, d_out, r, scale=0.02), s=(torch.rand(E, generator=gen) + 0.5).to(device),
                G=t(E, d_in, scale=d_in ** -0.5), gy=t(T, d_out))


def lora_moe_methods(v, k):
    """name → (f(x, A, B, G) -> y, which of (x, A, B, G) it differentiates): the frozen base linear,
    rocket with each GEMM backend, and the peers of bench/peers.py, on the tensors `v` of
    lora_moe_inputs."""
    from rocket.kernels.lora_moe import lora_moe
    W, b, s = v["W"], v["b"], v["s"]
    s0 = float(s[0])

    def rocket(backend):
        return lambda x, A, B, G: lora_moe(x, W, b, A, B, s, G, k, gemm_backend=backend)
    return {
        "base": (lambda x, A, B, G: F.linear(x, W, b), (0,)),
        "rocket": (rocket("auto"), (0, 1, 2, 3)),
        "rocket_triton": (rocket("triton"), (0, 1, 2, 3)),
        "rocket_tma": (rocket("tma"), (0, 1, 2, 3)),
        "rocket_cublas": (rocket("cublas"), (0, 1, 2, 3)),
        "dense_einsum": (lambda x, A, B, G: lora_moe_dense_einsum(x, W, b, A, B, s, G, k), (0, 1, 2, 3)),
        "grouped_triton": (lambda x, A, B, G: lora_moe_grouped(x, W, b, A, B, s, G, k), (0, 1, 2, 3)),
        "loop": (lambda x, A, B, G: lora_moe_loop(x, W, b, A, B, s, G, k), (0, 1, 2, 3)),
        "single_lora": (lambda x, A, B, G: lora_single(x, W, b, A[0], B[0], s0), (0, 1, 2)),
    }


def fwd_bwd(fn, wrt, v):
    """A step: y = fn(x, A, B, G) on fresh leaves of `v`, then the gradients of (y · gy) with respect
    to the leaves named by `wrt`; returns [y, *gradients]."""
    leaves = [v[n].detach().requires_grad_(i in wrt) for i, n in enumerate("xABG")]

    def step():
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, [leaves[i] for i in wrt], v["gy"])]
    return step


# --------------------------------------------------------------------------- training (random-init Llama)
# The training suite's shapes: GPU ~1.1B Llama, E=4 experts r=16; CPU: tiny, a correctness run.
TRAIN_GPU = dict(hidden=2048, layers=16, heads=16, mlp=5504, vocab=32000, E=4, r=16, n=4000, prompt=(100, 300),
                 answer=(50, 200), batch=8, steps=40, loop_steps=16, warm=6, pad=64)
# The scale users run (ROCKET_BENCH_SHAPES=7b): a 7B-shape Llama, micro-batch 2, examples up to the 1024-token cutoff.
TRAIN_7B = dict(hidden=4096, layers=32, heads=32, mlp=11008, vocab=32000, E=4, r=16, n=400, prompt=(300, 700),
                answer=(100, 324), batch=2, steps=30, loop_steps=8, warm=4, pad=64)
TRAIN_CPU = dict(hidden=64, layers=2, heads=4, mlp=128, vocab=512, E=3, r=4, n=48, prompt=(10, 30), answer=(5, 20),
                 batch=4, steps=6, loop_steps=4, warm=2, pad=16)


class IntTokenizer:
    """Text of space-separated token ids → those ids (BOS first): random-token data with no vocabulary."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __init__(self, vocab):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def __call__(self, text, add_special_tokens=True):
        ids = [int(w) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def random_llama(s, device, dtype, **config):
    """A random-init Llama of shape `s` (hidden, layers, heads, mlp, vocab) in `dtype`, sdpa attention;
    `config`: further LlamaConfig fields (token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=2048, tie_word_embeddings=False, **config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def build_model(s, device):
    """The training model: random_llama in bf16 on CUDA, float32 on the CPU, IntTokenizer's token ids."""
    return random_llama(s, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)


def random_bank(model, n, r, dtype=torch.float32, name="e{}", seed=0, draw_on="cpu"):
    """n random LoRA adapters (rank r, alpha 2r) on every LLAMA_TARGETS linear of `model`, named
    name.format(index): A ~ N(0, 1/d_in), B ~ N(0, 0.02²), in `dtype`, held in host memory.
    draw_on: the device whose generator draws them ("cuda" for banks of billions of weights: the
    CPU's generator draws ~10⁸ numbers a second)."""
    from rocket.adapters.bank import LoraAdapter, LoraBank
    from rocket.tiny import LLAMA_TARGETS
    gen = torch.Generator(draw_on).manual_seed(seed)
    modules = [(m_name, m) for m_name, m in model.named_modules() if m_name.rpartition(".")[2] in LLAMA_TARGETS]

    def draw(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=draw_on) * scale).to("cpu", dtype)
    adapters = []
    for a in range(n):
        weights = {m_name: (draw(r, m.in_features, scale=m.in_features ** -0.5), draw(m.out_features, r, scale=0.02))
                   for m_name, m in modules}
        adapters.append(LoraAdapter(name.format(a), Path("."), r, 2.0 * r, False, weights, {k: 2.0 for k in weights}))
    return LoraBank(adapters)


def random_token_rows(count, s, seed=0):
    """`count` random-token examples as (prompt length p, ids): p and the answer length uniform in
    s["prompt"] and s["answer"], ids uniform in [3, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        p, a = (int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in (s["prompt"], s["answer"]))
        yield p, torch.randint(3, s["vocab"], (p + a,), generator=gen).tolist()


def random_examples(s, seed=0):
    """s["n"] training examples (instruction = prompt ids, output = answer ids, as text for IntTokenizer)."""
    return [{"instruction": " ".join(map(str, ids[:p])), "input": "", "output": " ".join(map(str, ids[p:]))}
            for p, ids in random_token_rows(s["n"], s, seed)]


def template_file(directory: Path) -> Path:
    """A prompt template that joins instruction and input with a space (no other text)."""
    path = directory / "ids.json"
    path.write_text(json.dumps({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}"}))
    return path


def history(res):
    """(tokens, padded, seconds) per step of a rocket.train result."""
    return [(i.tokens, i.padded, i.seconds) for i in res.history]


def rate(steps, warm):
    """(tokens/s, median ms per step) over (tokens, padded, seconds) steps after the first `warm`,
    leaving out each batch shape's first step (Triton autotuning, allocator growth) in every row."""
    seen, kept = set(), []
    for i, (tokens, padded, seconds) in enumerate(steps):
        if i >= warm and padded in seen:
            kept.append((tokens, seconds))
        seen.add(padded)
    kept = kept or [(t, x) for t, _, x in steps[warm:]]  # tiny CPU runs may repeat no shape
    return sum(t for t, _ in kept) / sum(x for _, x in kept), 1e3 * statistics.median(x for _, x in kept)


# --------------------------------------------------------------------------- dedup
def planted_unit_vectors(n, d, device, dtype, dup_frac=0.1, noise=0.02, seed=0):
    """Random unit vectors, dup_frac of them replaced by noisy copies of others (cos ≈ 0.9998 at
    noise 0.02, d=1024), and random priorities. Generated on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    emb = torch.randn(n, d, generator=gen, device=device)
    k = int(n * dup_frac)
    src = torch.randint(0, n, (k,), generator=gen, device=device)
    dst = torch.randint(0, n, (k,), generator=gen, device=device)
    emb[dst] = emb[src] + noise * torch.randn(k, d, generator=gen, device=device)
    return F.normalize(emb, dim=1).to(dtype), torch.rand(n, generator=gen, device=device)


# --------------------------------------------------------------------------- augment (stage 3)
def word_corpus(vocab, topics, topic_words, seed=0):
    """A synthetic vocabulary of `vocab` distinct 5-letter words (uint8 rows "abcde ", `table`; as
    strings, `words`) and `topics` topics of `topic_words` word ids each."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(26 ** 5, vocab, replace=False)
    letters = (codes[:, None] // 26 ** np.arange(5)) % 26 + ord("a")
    table = np.concatenate([letters, np.full((vocab, 1), ord(" "))], axis=1).astype(np.uint8)
    return {"table": table, "words": [bytes(row[:5]).decode() for row in table],
            "topics": rng.integers(0, vocab, (topics, topic_words))}


def synthetic_texts(topic, corpus, pairs=((), (), ()), lengths=(48, 398), topic_p=0.5, substitute=0.03, seed=0,
                    chunk=100_000):
    """One text per entry of `topic` (numpy, chunk by chunk: 1e6 texts in seconds): lengths[0]..lengths[1]
    words, each from the text's topic with probability topic_p, else uniform over the vocabulary.
    pairs (src, dst, exact): text dst becomes a copy of text src, exact or with `substitute` of its
    words replaced. Returns (texts, words per text); synthetic_encoder's tokenizer makes one token a word."""
    table, topic_table = corpus["table"], corpus["topics"]
    rng = np.random.default_rng(seed)
    topic = np.asarray(topic)
    texts, n_words = [], rng.integers(lengths[0], lengths[1] + 1, len(topic))
    for s in range(0, len(topic), chunk):
        n = n_words[s:s + chunk]
        ids = rng.integers(0, len(table), int(n.sum()), dtype=np.int32)
        own = np.flatnonzero(rng.random(len(ids)) < topic_p)
        ids[own] = topic_table[np.repeat(topic[s:s + chunk], n)[own], rng.integers(0, topic_table.shape[1], len(own))]
        flat = table[ids].tobytes().decode("ascii")
        ends = 6 * np.cumsum(n)
        texts += [flat[a:b - 1] for a, b in zip((ends - 6 * n).tolist(), ends.tolist())]
    for src, dst, exact in zip(*pairs):
        words = texts[src].split(" ")
        if not exact:
            for i in rng.choice(len(words), max(1, round(substitute * len(words))), replace=False):
                words[i] = corpus["words"][rng.integers(len(table))]
        texts[dst], n_words[dst] = " ".join(words), n_words[src]
    return texts, n_words


def synthetic_encoder(directory, words, hidden=384, layers=6, heads=12, intermediate=1536, max_positions=512, seed=0):
    """A random-init BERT (all-MiniLM-L6-v2's shape by default) saved as a sentence-transformers
    directory: Transformer (max_seq_length 512) + mean Pooling + Normalize, which both
    SentenceTransformer(directory) and rocket's Embedder (its plain-HF path) load. The tokenizer is
    word-level over `words` ([CLS] w… [SEP]: words + 2 tokens). Word embeddings have unit variance and
    position / token-type embeddings are zero, so a text's embedding is near the mean of its words'
    vectors: similarity follows shared words, and a copy with a few words replaced stays above τ."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    directory = Path(directory)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + list(words))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_positions
                            ).save_pretrained(directory)
    cfg = BertConfig(vocab_size=len(special) + len(words), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
                     pad_token_id=0, initializer_range=0.002)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(cfg)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    model.save_pretrained(directory)
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_positions,
                                                                     "do_lower_case": False}))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden,
                                                                    "pooling_mode_mean_tokens": True}))
    (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate([("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])]))
    return directory
