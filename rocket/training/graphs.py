"""Captured micro-batches (`rocket train --cuda-graphs`, docs/design.md 'Captured training steps'):
the torch engine's forward, loss and backward of one micro-batch recorded once per batch shape in a
CUDA graph and replayed, so the host issues one launch where it issued thousands (a 7B-shape step
with 224 LoRA-MoE layers is bound by the host's kernel launches, bench/README.md).

What the capture needs and how it is met:
- static shapes: batches are right-padded to a multiple of `pad_to_multiple`, and one graph is kept
  per (micro-batch, length); the graphs share one memory pool, which is safe because each replay's
  only output (the summed token loss) is read before the next replay;
- no host synchronisation inside: transformers reads a 2-D padding mask (or, without one, the
  position ids) on the host to decide which mask to build, so the graph builds the 4-D mask itself
  from the batch's padding mask (causal, pads hidden as keys; additive, taken as it is by sdpa and
  eager attention): every position, pads included, sees what the eager forward shows it. The
  layers' tuners ran in the warm-up before the capture;
- gradients accumulate in place: they exist (zeros) before the capture and are zeroed, not freed,
  after every optimizer step, so the captured backward adds into the same tensors every replay.
The warm-up passes' gradients and the CUDA generator's state are restored after a capture, so a
capture in the middle of a step changes neither. Dropout draws its masks from that generator at
replay time, reseeded every step as in the eager loop, but in another order than the eager
kernels: a run with dropout is reproducible with graphs, not bit-identical to one without.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from rocket.moe.inject import moe_layers
from rocket.training.batches import micro_batch_loss

log = logging.getLogger("rocket.train")


def attention_mask_4d(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask of a [B, L] padding mask: 0 where query i may attend key j (j ≤ i
    and j not a pad), the dtype's minimum elsewhere; built on the GPU, so a capture may contain it.
    transformers hands a 4-D mask to the attention as it is."""
    L = attention_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return torch.zeros((), dtype=dtype, device=attention_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor    # static inputs, copied into before each replay
    labels: torch.Tensor
    weights: torch.Tensor
    attention_mask: torch.Tensor
    part: torch.Tensor         # static output: the micro-batch's summed token loss


class CapturedMicroBatches:
    """`(batch, weights) → summed token loss` of one micro-batch, gradients accumulated into the
    trainable parameters' .grad, replayed from a CUDA graph per batch shape (captured on first sight)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], aux_loss: bool, warmup: int = 2):
        self.model, self.params, self.aux_loss, self.warmup = model, params, aux_loss, warmup
        self.device = params[0].device
        self.graphs: dict[tuple[int, ...], _Captured] = {}
        self._pool = None
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def __call__(self, batch: dict, weights: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch["input_ids"].shape)
        captured = self.graphs.get(shape)
        if captured is None:
            captured = self.graphs[shape] = self._capture(batch, weights)
        captured.input_ids.copy_(batch["input_ids"])
        captured.labels.copy_(batch["labels"])
        captured.weights.copy_(weights)
        captured.attention_mask.copy_(batch["attention_mask"])
        captured.graph.replay()
        return captured.part

    def _forward_backward(self, input_ids, labels, weights, attention_mask) -> torch.Tensor:
        mask = attention_mask_4d(attention_mask, self.model.dtype)
        logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        part, loss = micro_batch_loss(self.model, logits, labels, weights, self.aux_loss)
        loss.backward()
        if self.aux_loss:  # the layers' balancing losses would keep this graph's AccumulateGrad nodes, made
            for layer in moe_layers(self.model).values():  # on the warm-up stream, alive into the capture
                layer.aux_loss = None
        return part.detach()

    def _capture(self, batch: dict, weights: torch.Tensor) -> _Captured:
        start = time.perf_counter()
        inputs = tuple(t.clone() for t in (batch["input_ids"], batch["labels"], weights, batch["attention_mask"]))
        grads = [p.grad.clone() for p in self.params]  # the warm-up passes add to them
        rng = torch.cuda.get_rng_state(self.device)
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)  # warm-up off the capture stream, as torch.cuda.graphs asks
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # tunes the kernels of this shape: nothing is timed in a capture
                self._forward_backward(*inputs)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            part = self._forward_backward(*inputs)
        self._pool = graph.pool()
        for p, g in zip(self.params, grads):
            p.grad.copy_(g)
        torch.cuda.set_rng_state(rng, self.device)
        torch.cuda.empty_cache()  # the warm-up's activations: the graph's pool holds its own
        log.info("cuda graphs: captured micro-batch shape %s in %.1f s (%d shape(s) so far)",
                 "×".join(map(str, inputs[0].shape)), time.perf_counter() - start, len(self.graphs) + 1)
        return _Captured(graph, *inputs, part)
