"""Training throughput of the LoRA mixture of experts on several GPUs, DeepSpeed ZeRO-3 (bench/README.md).

    python bench/train_multigpu.py --gpus 1 2 [--steps 60] [--stage 3]

Launches `torchrun --nproc_per_node G` once per G on the model, bank and data of bench/test_train.py
(bench/cases.py: ~1.1B Llama, E=4 r=16, top-2, micro-batch 8 per GPU) and writes one result file with a row per G:
global tokens/s (non-padding tokens of all ranks per second, leaving out warm-up steps and each
batch shape's first step) and the scaling efficiency against the smallest G of the run.
Needs deepspeed. Without CUDA it runs the CPU shapes of bench/test_train.py (TRAIN_CPU) over gloo (a
correctness run of the same code, not a result).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Recorder  # noqa: E402


def child(out: Path, steps: int, stage: int) -> None:
    """One torchrun process: train, then rank 0 writes this world size's row to `out`."""
    from bench.cases import (TRAIN_CPU, TRAIN_GPU, IntTokenizer, build_model, history, random_bank, random_examples,
                             rate, template_file)
    from rocket.training.loop import train

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    s = TRAIN_GPU if on_gpu else TRAIN_CPU
    model = build_model(s, device)
    bank = random_bank(model, s["E"], s["r"])
    with tempfile.TemporaryDirectory() as tmp:
        res = train(model, random_examples(s), bank, Path(tmp) / "run", tokenizer=IntTokenizer(s["vocab"]),
                    backend="deepspeed", deepspeed_config=f"zero{stage}", progress=rank == 0, device=device,
                    batch_size=s["batch"], grad_accum=1, lora_dropout=0.0, lr=5e-5, cutoff=1024,
                    template=str(template_file(Path(tmp))), epochs=1, max_steps=steps, save_steps=10 ** 9,
                    warmup_ratio=0.0, pad_to_multiple=s["pad"])
    tps, step_ms = rate(history(res), s["warm"])
    total = torch.tensor([tps], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(total)  # ranks step together: the global rate is the sum of theirs
    if rank == 0:
        out.write_text(json.dumps({"tokens_per_s": float(total), "median_step_ms": step_ms, "steps": res.steps,
                                   "first_last_loss": [res.losses[0], res.losses[-1]], "backend": res.backend,
                                   "world": world}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--stage", type=int, choices=[2, 3], default=3)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, args.stage)
        return 0
    on_gpu = torch.cuda.is_available()
    if on_gpu and torch.cuda.device_count() < max(args.gpus):
        sys.exit(f"train_multigpu: --gpus {max(args.gpus)} needs that many CUDA devices, found "
                 f"{torch.cuda.device_count()}")
    from bench.cases import TRAIN_CPU, TRAIN_GPU
    s = TRAIN_GPU if on_gpu else TRAIN_CPU
    rows = {}
    for g in args.gpus:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = Path(f.name)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={g}", __file__,
               "--child", str(out), "--steps", str(args.steps), "--stage", str(args.stage)]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}:" + os.environ.get(
            "PYTHONPATH", "")})
        rows[g] = json.loads(out.read_text())
        out.unlink()
        print(f"{g} process(es): {rows[g]['tokens_per_s']:.0f} tokens/s, median step {rows[g]['median_step_ms']:.1f} ms",
              flush=True)
    rec = Recorder("train_multigpu")
    base = min(rows)
    for g, r in rows.items():
        shape = {k: s[k] for k in ("hidden", "layers", "mlp", "vocab", "E", "r", "batch", "pad")}
        rec.record(torch.device("cuda" if on_gpu else "cpu"), shape | {"top_k": 2, "gpus": g, "zero_stage": args.stage},
                   {"rocket_zero": r["median_step_ms"]}, tokens_per_s=r["tokens_per_s"],
                   scaling_efficiency=r["tokens_per_s"] / (rows[base]["tokens_per_s"] * g / base),
                   first_last_loss=r["first_last_loss"], steps=r["steps"])
    if on_gpu:
        print(f"bench results: {rec.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
