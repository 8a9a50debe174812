"""Stage 4: train the LoRA mixture of experts (docs/design.md; the reference implementation's
finetune recipe).

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
`OUT/checkpoints/step-N/{moe.safetensors, optimizer.safetensors, trainer_state.json}`. OUT itself
becomes the trained-MoE directory (rocket.moe.state: moe.safetensors, the tokenizer's files,
rocket_moe_config.json last), which loads with `rocket.load_moe(base_model, OUT)`.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable
import torch
from rocket.data.examples import load_examples
from rocket.modeling import check_model_dir, default_device, load_model, load_tokenizer, resolve_dtype
from rocket.moe.state import MOE_FILE, write_moe_dir
from rocket.data.tokenize import pad_batch
from rocket.training.batches import prepare_examples, length_grouped_batches, rank_batches
from rocket.training.checkpoint import (run_key, CONFIG_FILE, LOSSES_FILE, OPTIM_FILE, _check_resumable,
                                       checkpoint_dirs, latest_checkpoint, read_checkpoint, save_checkpoint, writing)
from rocket.training.config import StepInfo, TrainConfig, TrainResult
from rocket.training.engines import check_cuda_graphs, make_engine
from rocket.errors import TrainError
from rocket.io import write_json
from rocket.progress import progress_bar


log = logging.getLogger("rocket.train")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then linear decay to 0."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total - step) / max(1, total - warmup))


def _last_good(ckpt: Path | None) -> str:
    return f"the last good checkpoint is {ckpt}" if ckpt is not None else "no checkpoint has been written"


def _check_weights(engine, step: int, last_good: Path | None):
    """Before a checkpoint or the final state is written: a NaN or Inf weight stops the run instead
    (docs/design.md §7)."""
    bad = engine.nonfinite_parameter()
    if bad is not None:
        raise TrainError(f"step {step}: the trained weights are not finite ({bad}); {_last_good(last_good)}")


def _load_bank(experts):
    from rocket.adapters.bank import LoraBank
    return experts if isinstance(experts, LoraBank) else LoraBank.load(experts)


# --------------------------------------------------------------------------- the loop
def train(base_model, data, experts, out, *, tokenizer=None, config: TrainConfig | None = None,
          deepspeed_config=None, backend: str = "auto", device=None, resume: bool | str | Path = False,
          progress: bool = True, on_step: Callable[[StepInfo], None] | None = None, **overrides) -> TrainResult:
    """Train the LoRA mixture of experts; returns the trained model and the loss per step.

    base_model: HF model directory or model object (then `tokenizer` too); data: a JSONL/JSON path
    or a list of examples; experts: a manifest .txt / bank directory / LoraBank (every adapter in it
    becomes an expert); out: the output directory, which becomes the trained-MoE directory (the
    tokenizer saved with it) that load_moe reads. config or keyword overrides: TrainConfig fields.
    resume: True → the latest checkpoint in out (none: start fresh), or a checkpoint directory; a
    checkpoint of other settings, data or experts is an error. "auto" → the latest checkpoint when it
    belongs to this run (see run_key), else start fresh (what `rocket run` uses).
    """
    from rocket.moe.inject import inject_lora_moe

    cfg = config or TrainConfig()
    if overrides:
        cfg = TrainConfig.from_dict({**asdict(cfg), **overrides})
        unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise TrainError(f"train(): unknown option(s) {', '.join(sorted(unknown))}")
    out = Path(out)
    device = default_device(device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if cfg.cuda_graphs:
        check_cuda_graphs(backend, deepspeed_config, device)
    if not isinstance(base_model, torch.nn.Module):
        check_model_dir(base_model)  # cheap: a wrong directory is one line before any long work
    tokenizer = load_tokenizer(base_model, tokenizer)
    dtype = resolve_dtype("auto", device)

    where = str(data) if isinstance(data, (str, Path)) else "training data"
    examples = load_examples(data) if isinstance(data, (str, Path)) else list(data)
    bank = _load_bank(experts)
    key = run_key(cfg, examples, bank.names)
    found = None  # (checkpoint, its trainer state)
    if resume == "auto" or (resume and not isinstance(resume, (str, Path))):
        found = latest_checkpoint(out)  # the newest complete one: damaged newer ones are skipped with a warning
        if found is None:
            log.info("resume: no checkpoint in %s, starting from step 0", out / "checkpoints")
        elif resume == "auto" and found[1].get("key") != key:  # another run's: a fresh start
            log.info("resume: the checkpoints in %s belong to another run; starting from step 0", out / "checkpoints")
            shutil.rmtree(out / "checkpoints")
            found = None
    elif resume:
        found = Path(resume), read_checkpoint(Path(resume))
    elif checkpoint_dirs(out):
        raise TrainError(f"{out}: holds checkpoints of an earlier run; pass --resume or choose another --out")
    ckpt, saved_state = found or (None, None)

    model = load_model(base_model, device, dtype)
    tokenized = prepare_examples(examples, tokenizer, cfg, where)
    if saved_state is not None:  # before any expensive setup
        _check_resumable(ckpt, saved_state, cfg, int(os.environ.get("WORLD_SIZE", "1")), len(tokenized), key)
    torch.manual_seed(cfg.seed)
    inject_lora_moe(model, bank, list(range(len(bank))), target_modules=cfg.target_modules, top_k=cfg.top_k,
                    dropout=cfg.lora_dropout, seed=cfg.seed, load_balancing=cfg.aux_loss_coef > 0,
                    train_router_only=cfg.train_router_only)
    if ckpt is not None:
        from rocket.moe.state import load_moe_state
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
    meta = {"config": asdict(cfg), "key": key, "world_size": world, "examples": len(tokenized), "total_steps": total,
            "experts": bank.names, "base_model": str(base_model) if not isinstance(base_model, torch.nn.Module)
            else None}
    start, losses = 0, []
    if saved_state is not None:
        from safetensors.torch import load_file
        engine.load_optimizer_tensors(load_file(str(ckpt / OPTIM_FILE)), saved_state["step"], ckpt)
        start, losses = int(saved_state["step"]), list(saved_state.get("losses", []))
        log.info("resumed from %s at step %d of %d", ckpt, start, total)
    if rank == 0:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = progress_bar(total=total, initial=start, desc="training", unit="step", disable=not progress or rank != 0)
    history, tokens_seen, t_begin = [], 0, time.perf_counter()
    dist = world > 1
    step, last_good = start, ckpt
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        batches = rank_batches(length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length),
                               rank, world)
        for s in range(first, steps_per_epoch):
            if step >= total:
                break
            t0 = time.perf_counter()
            group = [pad_batch([tokenized[i] for i in idx], pad_id, device, cfg.pad_to_multiple)
                     for idx in batches[s * cfg.grad_accum:(s + 1) * cfg.grad_accum]]
            n_tok = torch.tensor(float(sum(b["n_target"] for b in group)), device=device)
            if dist:
                torch.distributed.all_reduce(n_tok)
            # gradients are averaged over ranks, hence × world: the step optimises the global token mean
            weights = torch.stack((world / n_tok, torch.full_like(n_tok, cfg.aux_loss_coef / len(group))))
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout: a function of the step
            loss_sum = torch.zeros((), device=device)
            for i, b in enumerate(group):
                loss_sum += engine.forward_backward(b, i == len(group) - 1, weights)
            if dist:
                torch.distributed.all_reduce(loss_sum)
            step_loss = float(loss_sum / n_tok)
            if not math.isfinite(step_loss):  # stop before the optimizer step: the weights stay finite
                raise TrainError(f"step {step + 1}: the loss is not finite ({step_loss}); {_last_good(last_good)}")
            lr = lr_at(step, total, cfg)
            engine.step(lr)
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
                _check_weights(engine, step, last_good)
                last_good = save_checkpoint(engine, out, step, {**meta, "losses": losses}, cfg.save_total_limit)
            if on_step is not None:
                on_step(info)
    bar.close()
    seconds = time.perf_counter() - t_begin
    _check_weights(engine, step, last_good)
    hint = f"; {_last_good(last_good)}"
    with writing(out / MOE_FILE, hint) as f:
        engine.save_moe(f)
    if rank == 0:
        with writing(out / CONFIG_FILE, hint) as f:
            write_json(f, {**meta, "backend": engine.name, "steps": step}, indent=2)
        with writing(out / LOSSES_FILE, hint) as f:
            write_json(f, losses, indent=2)
        with writing(out, hint):
            write_moe_dir(out, tokenizer)
    return TrainResult(model, losses, step, engine.name, out, tokens_seen, seconds, history)
