"""Stage 4: train the LoRA mixture of experts (DESIGN.md §3; the seed's finetune recipe).

Experts come from the selected adapters (a manifest such as `experts.txt`, or a bank), one router
per wrapped linear, top-2, 5 epochs at lr 5e-5, cutoff 1024. One loop serves every backend:

- `deepspeed` (ZeRO-2/3 configs in rocket/configs/, bf16 on the GPU; the CPU works too): taken
  for several processes (ZeRO-3 unless --deepspeed names another config) and whenever a
  --deepspeed config is given. Several GPUs: one process per GPU with
  `deepspeed --num_gpus N --no_local_rank --module rocket.cli train ...` or
  `torchrun --nproc_per_node N -m rocket.cli train ...`;
- `torch`: plain torch AdamW (float32 masters, bf16 compute on the GPU) for one process without a
  DeepSpeed config, where it is the faster of the two, or when DeepSpeed is missing or cannot
  start on the CPU. The log says which backend runs and why.

Batches are length-grouped and padded on the right; the loss is the mean cross-entropy over the
output tokens of a whole optimizer step (prompt tokens masked), so it does not depend on how the
step is split into micro-batches. The learning rate is a function of the step (linear warm-up,
linear decay) and dropout is reseeded from (seed, step, rank) at every step, so a checkpoint needs
only the weights, the AdamW moments and the step to continue exactly where the run stopped.

Checkpoints (safetensors + JSON, written atomically) hold the router and expert weights only:
`OUT/checkpoints/step-N/{moe.safetensors, optimizer.safetensors, trainer_state.json}`; the final
`OUT/moe.safetensors` loads with `rocket.load_moe(base_model, OUT)`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from rocket.data import IGNORE_INDEX, DataError, Tokenized, load_examples, tokenize_examples
from rocket._namesake import make_module_callable
from rocket.errors import RocketError

log = logging.getLogger("rocket.train")

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = {"zero2": CONFIG_DIR / "ds_zero2.json", "zero3": CONFIG_DIR / "ds_zero3.json"}
MOE_FILE, OPTIM_FILE, STATE_FILE = "moe.safetensors", "optimizer.safetensors", "trainer_state.json"
CONFIG_FILE, LOSSES_FILE = "train_config.json", "losses.json"
# Settings a checkpoint must share with the run that resumes it (else the batch plan or schedule differ).
PLAN_KEYS = ("epochs", "max_steps", "lr", "warmup_ratio", "batch_size", "grad_accum", "seed", "cutoff",
             "template", "overflow", "group_by_length", "top_k", "train_router_only")


class TrainError(RocketError):
    """A training setup that cannot run: bad configuration, checkpoint or output directory."""


@dataclass
class TrainConfig:
    """Hyperparameters of a run (saved with every checkpoint). Defaults are the seed's recipe."""
    epochs: int = 5
    lr: float = 5e-5
    cutoff: int = 1024
    batch_size: int = 4              # micro-batch per device
    grad_accum: int = 1              # micro-batches per optimizer step
    top_k: int = 2
    train_router_only: bool = False
    template: str = "alpaca"
    overflow: str = "drop"           # examples longer than cutoff: drop | truncate | error
    group_by_length: bool = True
    pad_to_multiple: int = 16        # few distinct batch shapes: kernels tuned per shape are reused
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_dropout: float = 0.0
    aux_loss_coef: float = 0.0       # Switch load-balancing loss, off as in the seed
    target_modules: list[str] | None = None
    seed: int = 0
    max_steps: int | None = None     # stop (and end the schedule) after this many steps
    save_steps: int = 0              # checkpoint every N steps (0: at the end of each epoch)
    save_total_limit: int = 2

    def __post_init__(self):
        for name in ("epochs", "cutoff", "batch_size", "grad_accum", "top_k", "pad_to_multiple"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if self.overflow not in ("drop", "truncate", "error"):
            raise TrainError(f"overflow must be drop, truncate or error, got {self.overflow!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be ≥ 1, got {self.max_steps}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class StepInfo:
    """What on_step callbacks receive after each optimizer step."""
    step: int          # steps done so far (1-based)
    total: int
    epoch: int
    loss: float        # mean output-token cross-entropy of the step
    lr: float
    tokens: int        # non-padding tokens of the step (this rank)
    padded: int        # batch elements including padding (this rank)
    seconds: float     # wall time of the step


@dataclass
class TrainResult:
    model: torch.nn.Module
    losses: list[float]
    steps: int
    backend: str
    out: Path
    tokens: int = 0
    seconds: float = 0.0
    history: list[StepInfo] = field(default_factory=list, repr=False)


# --------------------------------------------------------------------------- data
def prepare_examples(examples, tokenizer, cfg: TrainConfig, where: str = "training data") -> list[Tokenized]:
    """Tokenise with the prompt masked; drop (or truncate) examples over the cutoff. Errors when
    nothing is left to train on."""
    if not examples:
        raise DataError(f"{where}: no training examples")
    toks = tokenize_examples(examples, tokenizer, cfg.template, max_length=cfg.cutoff, overflow=cfg.overflow)
    # a sequence trains only if some label after the first position is an output token
    kept = [t for t in toks if t is not None and any(x != IGNORE_INDEX for x in t.labels[1:])]
    if not kept:
        full = tokenize_examples(examples, tokenizer, cfg.template)
        shortest = min(len(t.input_ids) for t in full)
        raise DataError(f"{where}: all {len(examples)} examples are longer than the cutoff of {cfg.cutoff} tokens "
                        f"(the shortest has {shortest}): raise --cutoff or use --overflow truncate")
    if len(kept) < len(examples):
        log.warning("%s: dropped %d of %d examples longer than the cutoff of %d tokens",
                    where, len(examples) - len(kept), len(examples), cfg.cutoff)
    return kept


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                           mega: int = 50) -> list[list[int]]:
    """Micro-batches of example indices for one epoch, a pure function of (seed, epoch).

    Shuffled; with group_by_length, each run of `mega` batches' worth of examples is sorted by
    length (so a batch pads little), batch order is shuffled again and the longest batch goes first
    (out-of-memory shows at once, as in HF's LengthGroupedSampler)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    batches = []
    span = batch_size * mega
    for s in range(0, len(perm), span):
        chunk = sorted(perm[s:s + span], key=lambda i: (-lengths[i], i))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    longest = max(range(len(batches)), key=lambda b: (max(lengths[i] for i in batches[b]), -b))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def rank_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's share of an epoch's batches; the list is wrapped to a multiple of world so every
    rank runs the same number of steps."""
    if world == 1:
        return batches
    padded = batches + batches[: (-len(batches)) % world]
    return padded[rank::world]


def collate(tokenized: list[Tokenized], idx: list[int], pad_id: int, device, multiple: int = 1) -> dict:
    """Input_ids / attention_mask / labels of the examples idx, right-padded to the longest rounded
    up to `multiple`; with their token counts (`n_input`, `n_target`) counted on the host, so the
    loop never waits for the device to learn them."""
    L = -(-max(len(tokenized[i].input_ids) for i in idx) // multiple) * multiple
    ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(idx), L, dtype=torch.long)
    labels = torch.full((len(idx), L), IGNORE_INDEX, dtype=torch.long)
    for b, i in enumerate(idx):
        t = tokenized[i]
        n = len(t.input_ids)
        ids[b, :n] = torch.tensor(t.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(t.labels)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "n_input": int(mask.sum()), "n_target": int((labels[:, 1:] != IGNORE_INDEX).sum())}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over the positions whose label is not masked."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then linear decay to 0."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total - step) / max(1, total - warmup))


# --------------------------------------------------------------------------- engines
def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class TorchEngine:
    """Plain torch: AdamW on the trainable tensors (float32 masters when the model is low-precision)."""
    name = "torch"

    def __init__(self, model, cfg: TrainConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.rank, self.world = 0, 1
        for _, p in _trainable(model):  # float32 masters; LoraMoELinear casts to the input dtype
            p.data = p.data.float()
        self.params = _trainable(model)
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=device.type == "cuda" or None)

    def forward(self, batch, boundary: bool):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def backward(self, loss):
        loss.backward()

    def step(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_moe(self, path: Path):
        from rocket.moe import save_moe_state
        save_moe_state(self.model, path)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params:
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out[f"{name}.{key}"] = st[key].detach().float().cpu().contiguous()
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor], steps: int, where: Path):
        sd = self.optimizer.state_dict()
        state = {}
        for i, (name, p) in enumerate(self.params):
            try:
                m, v = tensors[f"{name}.exp_avg"], tensors[f"{name}.exp_avg_sq"]
            except KeyError as e:
                raise TrainError(f"{where}: no optimizer state {e.args[0]!r}") from None
            state[i] = {"step": torch.tensor(float(steps)), "exp_avg": m.to(p.dtype), "exp_avg_sq": v.to(p.dtype)}
        sd["state"] = state
        self.optimizer.load_state_dict(sd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env():
    """torch.distributed env of a one-process job, unless a launcher has set it."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def load_ds_config(spec: str | Path | dict | None) -> dict:
    """A DeepSpeed config: a dict, a JSON file, or 'zero2' / 'zero3' (shipped); None → zero3."""
    if isinstance(spec, dict):
        return json.loads(json.dumps(spec))
    path = SHIPPED_CONFIGS.get(str(spec or "zero3"), Path(str(spec)))
    if not path.is_file():
        raise TrainError(f"--deepspeed {spec}: no such file (or use zero2 / zero3)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}:{e.lineno}: malformed DeepSpeed config ({e.msg})") from None


def fill_ds_config(ds: dict, cfg: TrainConfig, world: int, bf16: bool) -> dict:
    """Set what rocket's flags decide. rocket owns gradient accumulation (boundaries set per
    micro-batch), the optimizer and the schedule, so those sections of a user config are dropped."""
    for key in ("optimizer", "scheduler"):
        if ds.pop(key, None) is not None:
            log.warning("DeepSpeed config: ignoring its '%s' section (rocket sets AdamW and the schedule "
                        "from --lr / --epochs)", key)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.batch_size * world
    ds["gradient_clipping"] = cfg.max_grad_norm
    ds.setdefault("bf16", {})["enabled"] = bf16
    ds.setdefault("fp16", {})["enabled"] = False
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 around the model; rocket's own AdamW (torch's) as the client optimizer."""
    name = "deepspeed"

    def __init__(self, model, cfg: TrainConfig, ds_config: dict, device: torch.device):
        import deepspeed
        from rocket.moe import moe_layers

        _single_process_env()
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.cfg = cfg
        self.config = fill_ds_config(ds_config, cfg, self.world, bf16=device.type == "cuda")
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        if self.stage == 3:
            # LoraMoELinear reads its children's weights without calling them: ZeRO-3 must gather them
            # with the layer. (Marking the layer a z3 leaf module instead breaks the backward of the
            # module after it in DeepSpeed 0.19.)
            for layer in moe_layers(model).values():
                for p in (layer.base.weight, layer.base.bias, layer.router.weight):
                    if p is not None:
                        deepspeed.zero.register_external_parameter(layer, p)
        params = [p for _, p in _trainable(model)]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 model_parameters=params, config=self.config)
        self.model = model
        self.device = self.engine.device
        self.params = _trainable(model)
        self._deepspeed = deepspeed

    def forward(self, batch, boundary: bool):
        self.engine.set_gradient_accumulation_boundary(boundary)
        return self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)

    def _base_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def step(self, lr: float):
        for g in self._base_optimizer().param_groups:
            g["lr"] = lr
        self.engine.step()

    def _gathered(self):
        return self._deepspeed.zero.GatheredParameters([p for _, p in self.params], modifier_rank=None)

    def save_moe(self, path: Path):
        from rocket.moe import save_moe_state
        with self._gathered():  # collective under ZeRO-3: every rank enters, rank 0 writes
            if self.rank == 0:
                save_moe_state(self.model, path)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        out = {}
        for name, p in self.params:  # collective under ZeRO-3
            out[f"{name}.master"] = safe_get_full_fp32_param(p).detach().float().cpu().contiguous()
            for key in ("exp_avg", "exp_avg_sq"):
                t = safe_get_full_optimizer_state(p, key)
                if t is not None:
                    out[f"{name}.{key}"] = t.detach().float().cpu().contiguous()
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor], steps: int, where: Path):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        base = self._base_optimizer()
        if not base.state:  # AdamW creates its moments lazily: one zero-lr step with zero grads makes them
            for g in base.param_groups:
                g["lr"] = 0.0
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            base.step()
            base.zero_grad(set_to_none=True)
            link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:  # ZeRO-1/2 map each parameter to its moments after the first step
                link()
        for name, p in self.params:
            try:
                master = tensors[f"{name}.master"]
                m, v = tensors[f"{name}.exp_avg"], tensors[f"{name}.exp_avg_sq"]
            except KeyError as e:
                raise TrainError(f"{where}: no optimizer state {e.args[0]!r} (a checkpoint of another backend?)") \
                    from None
            dev = self.device
            safe_set_full_fp32_param(p, master.to(dev))
            safe_set_full_optimizer_state(p, m.to(dev), "exp_avg")
            safe_set_full_optimizer_state(p, v.to(dev), "exp_avg_sq")
        for st in base.state.values():
            if "step" in st:
                st["step"] = torch.full_like(torch.as_tensor(st["step"]), float(steps))


def make_engine(backend: str, model, cfg: TrainConfig, ds_config, device: torch.device):
    """The requested backend. 'auto': DeepSpeed for several processes or when a DeepSpeed config is
    given; one process without one trains with the plain torch loop, which is faster there (one
    device has nothing to partition: ZeRO-3 ran at 0.39× its speed on an H100, bench/results)."""
    if backend not in ("auto", "deepspeed", "torch"):
        raise TrainError(f"unknown backend {backend!r}: use auto, deepspeed or torch")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if backend == "auto" and not several and ds_config is None:
        log.info("backend: plain torch loop (one process and no --deepspeed config: ZeRO would only add "
                 "gather/partition work on one device)")
        return TorchEngine(model, cfg, device)
    if backend == "torch" and several:
        raise TrainError("backend torch runs one process: several processes (a launcher) need DeepSpeed")
    if backend == "torch":
        log.info("backend: plain torch loop (asked for)")
        return TorchEngine(model, cfg, device)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if backend == "deepspeed" or several:
            raise TrainError("DeepSpeed is not installed (pip install deepspeed): needed for --backend "
                             "deepspeed and for several processes") from None
        log.info("backend: plain torch loop (DeepSpeed is not installed; --deepspeed %s not used)", ds_config)
        return TorchEngine(model, cfg, device)
    ds = load_ds_config(ds_config)
    if backend == "auto" and device.type != "cuda" and not several:
        try:
            engine = DeepSpeedEngine(model, cfg, ds, device)
        except Exception as e:  # DeepSpeed's CPU support depends on its accelerator and build
            log.warning("backend: plain torch loop on the CPU (DeepSpeed could not start: %s)", e)
            return TorchEngine(model, cfg, device)
    else:
        engine = DeepSpeedEngine(model, cfg, ds, device)
    log.info("backend: DeepSpeed ZeRO-%d on %s, %d process(es), %s", engine.stage, device.type, engine.world,
             "bf16" if engine.config["bf16"]["enabled"] else "fp32")
    return engine


# --------------------------------------------------------------------------- checkpoints
def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(engine, out: Path, step: int, meta: dict, keep: int) -> Path | None:
    """OUT/checkpoints/step-N: MoE weights, AdamW state, trainer state; appears whole or not at all."""
    from safetensors.torch import save_file
    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    optim = engine.optimizer_tensors()  # collective calls first: every rank takes part
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.save_moe(tmp / MOE_FILE)
    if engine.rank != 0:
        return None
    save_file(optim, str(tmp / OPTIM_FILE))
    _write_json(tmp / STATE_FILE, {**meta, "step": step, "backend": engine.name})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in old[: max(0, len(old) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _read_state(ckpt: Path) -> dict:
    f = ckpt / STATE_FILE
    if not f.is_file():
        raise TrainError(f"{ckpt}: not a rocket training checkpoint (no {STATE_FILE})")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{f}:{e.lineno}: malformed JSON ({e.msg})") from None


def _check_resumable(ckpt: Path, state: dict, cfg: TrainConfig, world: int, n_examples: int):
    saved = state.get("config", {})
    for key in PLAN_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise TrainError(f"{ckpt}: made with {key}={saved[key]!r}, this run has {getattr(cfg, key)!r}; "
                             "resume with the same settings")
    if state.get("world_size", world) != world or state.get("examples", n_examples) != n_examples:
        raise TrainError(f"{ckpt}: made with {state.get('world_size')} process(es) on {state.get('examples')} "
                         f"examples, this run has {world} on {n_examples}")


# --------------------------------------------------------------------------- model loading
def _load_model(base_model, device: torch.device, dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    if isinstance(base_model, torch.nn.Module):
        return base_model.to(device=device, dtype=dtype)
    path = Path(base_model)
    if not path.is_dir():
        raise TrainError(f"{path}: no such model directory")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype)  # transformers < 4.56 ignores dtype=


def _load_tokenizer(base_model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    if isinstance(base_model, torch.nn.Module):
        raise TrainError("train(): a tokenizer is needed when base_model is a model object")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(base_model))


def _load_bank(experts):
    from rocket.bank import LoraBank
    return experts if isinstance(experts, LoraBank) else LoraBank.load(experts)


def load_moe(base_model, checkpoint, *, device=None, dtype=None):
    """The base model (directory or model object) with the trained LoRA-MoE of `checkpoint` (a run's
    output directory, a checkpoint directory, or its moe.safetensors), in eval mode."""
    from rocket.moe import load_moe_state
    ckpt = Path(checkpoint)
    file = ckpt / MOE_FILE if ckpt.is_dir() else ckpt
    if not file.is_file():
        raise TrainError(f"{checkpoint}: no {MOE_FILE} (expected a rocket train output or checkpoint)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = _load_model(base_model, device, dtype)
    load_moe_state(model, file)
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------- the loop
def train(base_model, data, experts, out, *, tokenizer=None, config: TrainConfig | None = None,
          deepspeed_config=None, backend: str = "auto", device=None, resume: bool | str | Path = False,
          progress: bool = True, on_step: Callable[[StepInfo], None] | None = None, **overrides) -> TrainResult:
    """Train the LoRA mixture of experts; returns the trained model and the loss per step.

    base_model: HF model directory or model object (then `tokenizer` too); data: a JSONL/JSON path
    or a list of examples; experts: a manifest .txt / bank directory / LoraBank (every adapter in it
    becomes an expert); out: the output directory. config or keyword overrides: TrainConfig fields.
    resume: True → the latest checkpoint in out (none: start fresh), or a checkpoint directory.
    """
    from rocket.moe import inject_lora_moe

    cfg = config or TrainConfig()
    if overrides:
        cfg = TrainConfig.from_dict({**asdict(cfg), **overrides})
        unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise TrainError(f"train(): unknown option(s) {', '.join(sorted(unknown))}")
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    where = str(data) if isinstance(data, (str, Path)) else "training data"
    examples = load_examples(data) if isinstance(data, (str, Path)) else list(data)
    ckpt = None
    if resume:
        ckpt = Path(resume) if isinstance(resume, (str, Path)) else latest_checkpoint(out)
        if ckpt is None:
            log.info("resume: no checkpoint in %s, starting from step 0", out / "checkpoints")
    elif latest_checkpoint(out) is not None:
        raise TrainError(f"{out}: holds checkpoints of an earlier run; pass --resume or choose another --out")
    saved_state = _read_state(ckpt) if ckpt is not None else None

    bank = _load_bank(experts)
    tokenizer = _load_tokenizer(base_model, tokenizer)
    model = _load_model(base_model, device, dtype)
    tokenized = prepare_examples(examples, tokenizer, cfg, where)
    if saved_state is not None:  # before any expensive setup
        _check_resumable(ckpt, saved_state, cfg, int(os.environ.get("WORLD_SIZE", "1")), len(tokenized))
    torch.manual_seed(cfg.seed)
    inject_lora_moe(model, bank, list(range(len(bank))), target_modules=cfg.target_modules, top_k=cfg.top_k,
                    dropout=cfg.lora_dropout, seed=cfg.seed, load_balancing=cfg.aux_loss_coef > 0,
                    train_router_only=cfg.train_router_only)
    if ckpt is not None:
        from rocket.moe import load_moe_state
        load_moe_state(model, ckpt / MOE_FILE)
    model.train()
    engine = make_engine(backend, model, cfg, deepspeed_config, device)
    device = getattr(engine, "device", device)
    rank, world = engine.rank, engine.world

    lengths = [len(t.input_ids) for t in tokenized]
    steps_per_epoch = math.ceil(len(rank_batches(length_grouped_batches(lengths, cfg.batch_size, cfg.seed, 0,
                                                                          cfg.group_by_length), 0, world))
                                / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    meta = {"config": asdict(cfg), "world_size": world, "examples": len(tokenized), "total_steps": total,
            "experts": bank.names, "base_model": str(base_model) if not isinstance(base_model, torch.nn.Module)
            else None}
    start, losses = 0, []
    if saved_state is not None:
        from safetensors.torch import load_file
        engine.load_optimizer_tensors(load_file(str(ckpt / OPTIM_FILE)), saved_state["step"], ckpt)
        start, losses = int(saved_state["step"]), list(saved_state.get("losses", []))
        log.info("resumed from %s at step %d of %d", ckpt, start, total)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not progress or rank != 0)
    history, tokens_seen, t_begin = [], 0, time.perf_counter()
    dist = world > 1
    step = start
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        batches = rank_batches(length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length),
                               rank, world)
        for s in range(first, steps_per_epoch):
            if step >= total:
                break
            t0 = time.perf_counter()
            group = [collate(tokenized, idx, pad_id, device, cfg.pad_to_multiple)
                     for idx in batches[s * cfg.grad_accum:(s + 1) * cfg.grad_accum]]
            n_tok = torch.tensor(float(sum(b["n_target"] for b in group)), device=device)
            if dist:
                torch.distributed.all_reduce(n_tok)
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout: a function of the step
            loss_sum = torch.zeros((), device=device)
            for i, b in enumerate(group):
                logits = engine.forward(b, boundary=i == len(group) - 1)
                part = token_loss_sum(logits, b["labels"])
                # gradients are averaged over ranks, hence × world: the step optimises the global token mean
                loss = part * world / n_tok
                if cfg.aux_loss_coef > 0:
                    from rocket.moe import moe_aux_loss
                    loss = loss + cfg.aux_loss_coef * moe_aux_loss(model) / len(group)
                engine.backward(loss)
                loss_sum += part.detach()
            lr = lr_at(step, total, cfg)
            engine.step(lr)
            if dist:
                torch.distributed.all_reduce(loss_sum)
            step_loss = float(loss_sum / n_tok)
            losses.append(step_loss)
            step += 1
            n_in = sum(b["n_input"] for b in group)
            tokens_seen += n_in
            n_pad = sum(b["input_ids"].numel() for b in group)
            info = StepInfo(step, total, epoch, step_loss, lr, n_in, n_pad, time.perf_counter() - t0)
            history.append(info)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
            end_of_epoch = s == steps_per_epoch - 1 or step == total
            if (cfg.save_steps and step % cfg.save_steps == 0) or (not cfg.save_steps and end_of_epoch):
                save_checkpoint(engine, out, step, {**meta, "losses": losses}, cfg.save_total_limit)
            if on_step is not None:
                on_step(info)
    bar.close()
    seconds = time.perf_counter() - t_begin
    engine.save_moe(out / MOE_FILE)
    if rank == 0:
        _write_json(out / CONFIG_FILE, {**meta, "backend": engine.name, "steps": step})
        _write_json(out / LOSSES_FILE, losses)
    return TrainResult(model, losses, step, engine.name, out, tokens_seen, seconds, history)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--base-model", "--base_model", required=True, help="HF model directory of the base model")
    a("--data", "--data_path", required=True, help="training examples (JSONL or JSON array), e.g. aug.jsonl")
    a("--experts", required=True,
      help="the selected adapters: a manifest .txt (rocket select's experts.txt) or a directory of adapters")
    a("--out", "--output_dir", required=True, help="output directory (checkpoints/, moe.safetensors)")
    a("--deepspeed", default=None,
      help="DeepSpeed config: a JSON file, or zero2 / zero3 (shipped; zero3 when several processes run)")
    a("--backend", choices=["auto", "deepspeed", "torch"], default="auto",
      help="auto (default): DeepSpeed for several processes or with --deepspeed (when installed and it "
           "starts), else the plain torch loop, the faster one on a single device")
    a("--train-router-only", "--train_router_only", action="store_true", help="freeze the experts, train routers")
    a("--top-k", "--top_k", type=int, default=d.top_k, help=f"experts per token (default {d.top_k})")
    a("--epochs", "--num_epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    a("--lr", "--learning_rate", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    a("--cutoff", "--cutoff_len", type=int, default=d.cutoff, help=f"max tokens per example (default {d.cutoff})")
    a("--batch-size", "--micro_batch_size", type=int, default=d.batch_size,
      help=f"micro-batch per device (default {d.batch_size})")
    a("--grad-accum", "--gradient_accumulation_steps", type=int, default=d.grad_accum,
      help=f"micro-batches per optimizer step (default {d.grad_accum})")
    a("--template", "--prompt_template_name", default=d.template,
      help="prompt template: alpaca, llama2, mistral, chat or a .json file (default alpaca)")
    a("--overflow", choices=["drop", "truncate", "error"], default=d.overflow,
      help="examples longer than --cutoff (default drop)")
    a("--no-group-by-length", dest="group_by_length", action="store_false", help="plain shuffled batches")
    a("--pad-to-multiple", type=int, default=d.pad_to_multiple,
      help=f"pad batch lengths to a multiple of this (default {d.pad_to_multiple})")
    a("--group_by_length", dest="group_by_length", action="store_true", help=argparse.SUPPRESS)
    a("--warmup-ratio", "--warmup_ratio", type=float, default=d.warmup_ratio, help=f"default {d.warmup_ratio}")
    a("--weight-decay", "--weight_decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    a("--max-grad-norm", "--max_grad_norm", type=float, default=d.max_grad_norm,
      help=f"gradient clipping, 0 for none (default {d.max_grad_norm})")
    a("--lora-dropout", "--lora_dropout", type=float, default=d.lora_dropout, help="dropout on expert inputs")
    a("--aux-loss-coef", type=float, default=d.aux_loss_coef, help="load-balancing loss weight (default 0: off)")
    a("--target-modules", "--lora_target_modules", default=None,
      help="comma-separated module names to wrap (default: every module the experts cover)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps (default: each epoch)")
    a("--save-total-limit", type=int, default=d.save_total_limit, help="checkpoints kept (default 2)")
    a("--resume", "--resume_from_checkpoint", nargs="?", const=True, default=False,
      help="continue from the latest checkpoint in --out, or from the checkpoint directory given")
    a("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="rocket train: %(message)s")
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, cutoff=args.cutoff, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, top_k=args.top_k, train_router_only=args.train_router_only,
                      template=args.template, overflow=args.overflow, group_by_length=args.group_by_length,
                      pad_to_multiple=args.pad_to_multiple,
                      warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm, lora_dropout=args.lora_dropout,
                      aux_loss_coef=args.aux_loss_coef, target_modules=targets, seed=args.seed,
                      max_steps=args.max_steps, save_steps=args.save_steps, save_total_limit=args.save_total_limit)
    result = train(args.base_model, args.data, args.experts, args.out, config=cfg, deepspeed_config=args.deepspeed,
                   backend=args.backend, device=args.device, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = (result.losses[0], result.losses[-1]) if result.losses else (float("nan"),) * 2
        print(f"trained {result.steps} steps ({result.backend}); loss {first:.4f} → {last:.4f}; "
              f"wrote {Path(args.out) / MOE_FILE}")
    return 0


make_module_callable(__name__, train)
