"""Training engines: the plain torch loop and DeepSpeed (ZeRO-2/3), behind one interface."""
from __future__ import annotations

import logging
import json
import os
import socket
from pathlib import Path
import torch
from rocket.training.batches import micro_batch_loss
from rocket.training.config import TrainConfig
from rocket.errors import TrainError

log = logging.getLogger("rocket.train")


CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = {"zero2": CONFIG_DIR / "ds_zero2.json", "zero3": CONFIG_DIR / "ds_zero3.json"}


# --------------------------------------------------------------------------- engines
def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _first_nonfinite(params: list[tuple[str, torch.Tensor]]) -> str | None:
    return next((name for name, p in params if not torch.isfinite(p).all()), None)


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
        self.captured = None
        if cfg.cuda_graphs:
            from rocket.training.graphs import CapturedMicroBatches
            self.captured = CapturedMicroBatches(model, [p for _, p in self.params], cfg.aux_loss_coef > 0)

    def forward_backward(self, batch, boundary: bool, weights: torch.Tensor) -> torch.Tensor:
        """Backpropagate one micro-batch (micro_batch_loss); returns its summed token loss."""
        if self.captured is not None:
            return self.captured(batch, weights)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        part, loss = micro_batch_loss(self.model, logits, batch["labels"], weights, self.cfg.aux_loss_coef > 0)
        loss.backward()
        return part.detach()

    def step(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.max_grad_norm)
        self.optimizer.step()
        # captured backward passes add into the same gradient tensors: zero them, keep them
        self.optimizer.zero_grad(set_to_none=self.captured is None)

    def save_moe(self, path: Path):
        from rocket.moe.state import save_moe_state
        save_moe_state(self.model, path)

    def nonfinite_parameter(self) -> str | None:
        """The name of the first trainable tensor holding a NaN or Inf, or None."""
        return _first_nonfinite(self.params)

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


def import_deepspeed():
    """deepspeed, imported with its log handler pointed at stderr: it logs its accelerator choice
    to stdout at import, and stdout is the commands' output (a script may parse it)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):  # its handler takes the stream current at creation
        import deepspeed
    return deepspeed


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 around the model; rocket's own AdamW (torch's) as the client optimizer."""
    name = "deepspeed"

    def __init__(self, model, cfg: TrainConfig, ds_config: dict, device: torch.device):
        deepspeed = import_deepspeed()
        from rocket.moe.inject import moe_layers

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

    def forward_backward(self, batch, boundary: bool, weights: torch.Tensor) -> torch.Tensor:
        """Backpropagate one micro-batch (micro_batch_loss); returns its summed token loss."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        part, loss = micro_batch_loss(self.model, logits, batch["labels"], weights, self.cfg.aux_loss_coef > 0)
        self.engine.backward(loss, scale_wrt_gas=False)
        return part.detach()

    def _base_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def step(self, lr: float):
        for g in self._base_optimizer().param_groups:
            g["lr"] = lr
        self.engine.step()

    def _gathered(self):
        return self._deepspeed.zero.GatheredParameters([p for _, p in self.params], modifier_rank=None)

    def save_moe(self, path: Path):
        from rocket.moe.state import save_moe_state
        with self._gathered():  # collective under ZeRO-3: every rank enters, rank 0 writes
            if self.rank == 0:
                save_moe_state(self.model, path)

    def nonfinite_parameter(self) -> str | None:
        """The name of the first trainable tensor holding a NaN or Inf, or None (the same on every rank:
        each sees the whole tensors)."""
        with self._gathered():  # collective under ZeRO-3
            return _first_nonfinite(self.params)

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


def check_cuda_graphs(backend: str, ds_config, device: torch.device) -> None:
    """A one-line TrainError, before anything loads, when --cuda-graphs cannot run: captured
    micro-batches (training.graphs) are the plain torch loop's, on a CUDA device, in one process."""
    if backend == "deepspeed" or ds_config is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("--cuda-graphs runs in the plain torch loop (one process, no --deepspeed config, "
                         "--backend torch or auto)")
    if torch.device(device).type != "cuda":
        raise TrainError(f"--cuda-graphs needs a CUDA device, got {device}")


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
        import_deepspeed()
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
