"""Training checkpoints: MoE weights, optimizer state and trainer state, written whole or not at all."""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from safetensors import SafetensorError, safe_open
from rocket.moe.state import CONFIG_KEY, MOE_FILE
from rocket.training.config import PLAN_KEYS, TrainConfig
from rocket.errors import TrainError
from rocket.io import atomic_path, write_json
from rocket.resume import digest


OPTIM_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"
CONFIG_FILE, LOSSES_FILE = "train_config.json", "losses.json"
# What a failed write raises: OSError, or safetensors' own error type for I/O errors (full disk).
WRITE_ERRORS = (OSError, SafetensorError)

log = logging.getLogger("rocket.train")


def _reason(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).splitlines()[0]


@contextmanager
def writing(path: Path, hint: str = ""):
    """Writes of an output inside this block that fail (full disk, no permission) end in one
    TrainError line naming `path` (docs/design.md §7)."""
    try:
        yield path
    except WRITE_ERRORS as e:
        raise TrainError(f"{path}: cannot write ({_reason(e)}){hint}") from None


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(engine, out: Path, step: int, meta: dict, keep: int) -> Path:
    """OUT/checkpoints/step-N: MoE weights, AdamW state, trainer state; appears whole or not at all.
    A failed write removes the partial checkpoint and leaves the earlier ones as they were."""
    from safetensors.torch import save_file
    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    optim = engine.optimizer_tensors()  # collective calls first: every rank takes part
    file = tmp
    try:
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        file = tmp / MOE_FILE
        engine.save_moe(file)
        if engine.rank != 0:
            return final
        file = tmp / OPTIM_FILE
        with atomic_path(file) as part:
            save_file(optim, str(part))
        file = tmp / STATE_FILE
        write_json(file, {**meta, "step": step, "backend": engine.name}, indent=2)
        file = final
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainError(f"step {step}: cannot write the checkpoint {final} ({file.name}: {_reason(e)}); "
                         "the earlier checkpoints are intact") from None
    old = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in old[: max(0, len(old) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def read_checkpoint(ckpt: Path) -> dict:
    """The trainer state of checkpoint `ckpt`, after the checks that cost no tensor reads: the JSON
    state parses and holds the step, and the safetensors files are whole (their headers parse and
    cover the file exactly, so a truncated file fails). Else one TrainError line naming the file."""
    if not ckpt.is_dir():
        raise TrainError(f"{ckpt}: no such checkpoint directory")
    f = ckpt / STATE_FILE
    if not f.is_file():
        raise TrainError(f"{ckpt}: not a rocket training checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(f.read_text(encoding="utf-8", errors="replace"))  # damaged bytes fail as JSON
    except json.JSONDecodeError as e:
        raise TrainError(f"{f}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise TrainError(f"{f}: no step (not a rocket trainer state)")
    for name in (MOE_FILE, OPTIM_FILE):
        try:
            with safe_open(str(ckpt / name), framework="pt") as st:
                meta = st.metadata() or {}
        except FileNotFoundError:
            raise TrainError(f"{ckpt / name}: missing") from None
        except SafetensorError as e:
            raise TrainError(f"{ckpt / name}: truncated or corrupt ({e})") from None
        if name == MOE_FILE and CONFIG_KEY not in meta:
            raise TrainError(f"{ckpt / name}: not a rocket MoE state (no '{CONFIG_KEY}' metadata)")
    return state


def checkpoint_dirs(out: Path) -> list[Path]:
    """The checkpoint directories in OUT/checkpoints, oldest first (complete or not)."""
    return sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir())


def latest_checkpoint(out: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint in OUT/checkpoints and its trainer state (read_checkpoint).
    A damaged newer one is skipped with a warning naming its bad file; None when there is no
    checkpoint, one TrainError line when there are some and none is complete."""
    damaged = []
    for ckpt in reversed(checkpoint_dirs(out)):
        try:
            return ckpt, read_checkpoint(ckpt)
        except TrainError as e:
            log.warning("resume: skipping %s: %s", ckpt.name, e)
            damaged.append(str(e))
    if damaged:
        raise TrainError(f"{out / 'checkpoints'}: no complete checkpoint left (newest: {damaged[0]}); "
                         "remove the directory to start from step 0")
    return None


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
