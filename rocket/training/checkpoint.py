"""Training checkpoints: MoE weights, optimizer state and trainer state, written whole or not at all."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from rocket.moe.state import MOE_FILE
from rocket.training.config import PLAN_KEYS, TrainConfig
from rocket.errors import TrainError
from rocket.io import write_json
from rocket.resume import digest


OPTIM_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"
CONFIG_FILE, LOSSES_FILE = "train_config.json", "losses.json"


# --------------------------------------------------------------------------- checkpoints
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
    write_json(tmp / STATE_FILE, {**meta, "step": step, "backend": engine.name}, indent=2)
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


def run_key(cfg: TrainConfig, examples: list, expert_names: list[str]) -> str:
    """What a checkpoint must share with the run that continues it: the settings that shape the
    batch plan and schedule, the training examples and the experts. Stored in every checkpoint;
    `rocket train --resume` and `rocket run` both resume only from a checkpoint with this key."""
    return digest({"plan": {k: getattr(cfg, k) for k in PLAN_KEYS}, "data": digest(examples),
                   "experts": list(expert_names)})


def _check_resumable(ckpt: Path, state: dict, cfg: TrainConfig, world: int, n_examples: int, key: str):
    saved = state.get("config", {})
    for name in PLAN_KEYS:
        if name in saved and saved[name] != getattr(cfg, name):
            raise TrainError(f"{ckpt}: made with {name}={saved[name]!r}, this run has {getattr(cfg, name)!r}; "
                             "resume with the same settings")
    if state.get("world_size", world) != world or state.get("examples", n_examples) != n_examples:
        raise TrainError(f"{ckpt}: made with {state.get('world_size')} process(es) on {state.get('examples')} "
                         f"examples, this run has {world} on {n_examples}")
    if state.get("key", key) != key:
        raise TrainError(f"{ckpt}: made from other training data or experts; resume with the same ones")
