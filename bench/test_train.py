"""Training throughput of the LoRA mixture of experts (docs/design.md §4, training; bench/README.md):
`rocket.train` on a random-init Llama against peers, same model, same batches, same loss, in one
process. The model, bank, data and shapes (TRAIN_GPU, TRAIN_CPU) are bench/cases.py's.

Rows (tokens/s = non-padding tokens through forward + backward + AdamW per second):
- rocket MoE under DeepSpeed ZeRO-3 (when installed) and under the plain torch loop, eager and
  (GPU) with every micro-batch shape replayed from a CUDA graph (`rocket_graphed`, --cuda-graphs;
  each shape's first step, which captures it, is left out as in every row);
- peer `peft_lora`: one peft LoRA (r=16, same seven projections) in a plain torch loop, bf16
  autocast and fp32 adapters as HF Trainer runs it (goal: rocket ≥ 0.85× its tokens/s);
- peer `reference_loop`: the same MoE with the reference implementation's per-expert loop (reference.lora_moe_loop) in
  place of the fused layer (goal: rocket ≥ 3×).
GPU: hidden 2048, 16 layers, MLP 5504, vocab 32000 (~1.1B), E=4 experts r=16, top-2, micro-batch 8,
examples of 150–500 tokens, lengths padded to a multiple of 64; 40 steps (16 for the reference implementation loop), so
the suite fits one device call. Every row leaves out the first step of each batch shape.
ROCKET_BENCH_SHAPES=7b: the scale users run, a 7B-shape Llama (hidden 4096, 32 layers, MLP 11008), micro-batch 2,
examples of 400–1024 tokens (bench/cases.py TRAIN_7B); peak GPU memory beside every row.
CPU: tiny shapes, a correctness run of the same code.
"""
import json
import os
import time

import pytest
import torch

from bench.cases import (TRAIN_7B, TRAIN_CPU, TRAIN_GPU, IntTokenizer, build_model, history, random_bank, random_examples, rate,
                         template_file)
from rocket.kernels import reference
from rocket.tiny import LLAMA_TARGETS
from rocket.data.tokenize import pad_batch
from rocket.training.batches import length_grouped_batches, prepare_examples, token_loss_sum
from rocket.training.loop import train
from rocket.training.config import TrainConfig

try:
    import deepspeed  # noqa: F401
    HAVE_DS = True
except ImportError:
    HAVE_DS = False


def peft_steps(model, tok, examples, cfg, steps, device):
    """One peft LoRA trained by a plain loop: rocket's batches and loss, AdamW, bf16 autocast on GPU."""
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(LLAMA_TARGETS),
                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, fused=device.type == "cuda" or None)
    toks = prepare_examples(examples, tok, cfg)
    batches = length_grouped_batches([len(t.input_ids) for t in toks], cfg.batch_size, cfg.seed, 0)
    out = []
    for b in batches[:steps]:
        t0 = time.perf_counter()
        batch = pad_batch([toks[i] for i in b], tok.pad_token_id, device, cfg.pad_to_multiple)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n = (batch["labels"][:, 1:] != -100).sum()
        (token_loss_sum(logits, batch["labels"]) / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel(), time.perf_counter() - t0))
    return out


def test_train_throughput(recorder, device, on_gpu, monkeypatch, tmp_path):
    if not on_gpu:  # the CPU path of a real run is the torch reference (see tests/test_train.py)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    s = (TRAIN_7B if os.environ.get("ROCKET_BENCH_SHAPES") == "7b" else TRAIN_GPU) if on_gpu else TRAIN_CPU
    t_start = time.perf_counter()

    def say(msg):  # progress with timestamps: a device run that hits its limit still shows where it was
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    tok = IntTokenizer(s["vocab"])
    examples = random_examples(s)
    base = build_model(s, device)
    bank = random_bank(base, s["E"], s["r"])
    say(f"model, bank and {len(examples)} examples ready")
    # one micro-batch per step without dropout, as the peft peer's steps
    cfg = dict(batch_size=s["batch"], grad_accum=1, lora_dropout=0.0, lr=5e-5, cutoff=1024,
               template=str(template_file(tmp_path)), epochs=1, save_steps=10 ** 9, warmup_ratio=0.0,
               pad_to_multiple=s["pad"])

    def run(name, backend, steps=s["steps"], **kw):
        def on_step(info):
            if info.step % 20 == 0:
                say(f"{name}: step {info.step}, loss {info.loss:.4f}, last step {1e3 * info.seconds:.0f} ms")
        res = train(_fresh(base), examples, bank, tmp_path / name, tokenizer=tok, backend=backend, progress=False,
                    device=device, on_step=on_step, **{**cfg, "max_steps": steps, **kw})
        assert res.losses[-1] == res.losses[-1] and res.steps == steps
        return res

    results, losses, peak_gib, resident_gib = {}, {}, {}, {}

    def done(name, steps, loss=None):
        if on_gpu:  # each row starts from a reset (run_row), so this is its own peak
            peak_gib[name] = torch.cuda.max_memory_allocated() / 2 ** 30
        results[name] = rate(steps, s["warm"] if name != "reference_loop" else min(s["warm"], s["loop_steps"] // 2))
        if loss is not None:
            losses[name] = loss
        say(f"{name}: {results[name][0]:.0f} tokens/s, median step {results[name][1]:.1f} ms"
            + (f", peak {peak_gib[name]:.1f} GiB ({resident_gib[name]:.1f} resident)" if on_gpu else ""))

    def reset_peak(name):  # every row's peak counts the untouched `base` kept for the next rows: resident_gib
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            resident_gib[name] = torch.cuda.memory_allocated() / 2 ** 30

    def run_row(name, backend, **kw):
        reset_peak(name)
        return run(name, backend, **kw)

    r = run_row("rocket_torch", "torch")
    done("rocket_torch", history(r), r.losses)
    r = None  # the result holds the trained model: free it, so the next rows' peaks are their own
    if on_gpu:  # the same loop, each micro-batch shape replayed from a CUDA graph (--cuda-graphs)
        r = run_row("rocket_graphed", "torch", cuda_graphs=True)
        done("rocket_graphed", history(r), r.losses)
        r = None
    reset_peak("peft_lora")
    done("peft_lora", peft_steps(_fresh(base), tok, examples, TrainConfig(**cfg), s["steps"], device))
    skipped = {}
    try:
        with monkeypatch.context() as m:
            import rocket.moe.layer as moe
            m.setattr(moe, "lora_moe",
                      lambda *a, return_routing=False, gemm_backend="auto", **k: reference.lora_moe_loop(*a, **k))
            r = run_row("reference_loop", "torch", steps=s["loop_steps"])
    except torch.OutOfMemoryError as e:  # the per-expert loop keeps every expert's activations: 116 GiB at 7B
        r, skipped["reference_loop"] = None, f"out of memory: {str(e).split('. ')[0]}"
        torch.cuda.empty_cache()
        say(f"reference_loop: {skipped['reference_loop']}")
    if r is not None:
        done("reference_loop", history(r))
        # same batches, same init: the loop MoE must agree with rocket's layer on the steps both ran
        assert r.losses == pytest.approx(losses["rocket_torch"][: s["loop_steps"]], rel=2e-2 if on_gpu else 1e-4)
        r = None
    if HAVE_DS:
        r = run_row("rocket_zero3", "deepspeed", deepspeed_config="zero3")
        done("rocket_zero3", history(r), r.losses)

    tps = {k: v[0] for k, v in results.items()}
    row = recorder.record(device, {k: s[k] for k in ("hidden", "layers", "mlp", "vocab", "E", "r", "batch", "steps",
                                                     "pad")} | {"top_k": 2, "gpus": 1, "cutoff": 1024},
                          {k: v[1] for k, v in results.items()}, baseline="peft_lora", tokens_per_s=tps,
                          rocket_vs_peft={k: tps[k] / tps["peft_lora"] for k in tps if k.startswith("rocket")},
                          rocket_vs_reference_loop={k: tps[k] / tps["reference_loop"] for k in tps
                                                    if k.startswith("rocket") and "reference_loop" in tps} or None,
                          skipped=skipped or None,
                          first_last_loss={k: (v[0], v[-1]) for k, v in losses.items()},
                          peak_memory_gib=peak_gib or None, resident_memory_gib=resident_gib or None)
    print(json.dumps(row, indent=1), flush=True)
    if "rocket_graphed" in losses:  # the captured loop trains like the eager one (bf16: near, not equal)
        assert losses["rocket_graphed"] == pytest.approx(losses["rocket_torch"], rel=2e-2)
    if HAVE_DS:  # ZeRO-3 and the torch loop train the same model on the same batches
        assert losses["rocket_zero3"] == pytest.approx(losses["rocket_torch"], rel=2e-2 if on_gpu else 1e-4)


def _fresh(model):
    import copy
    return copy.deepcopy(model)
