"""`LoraMoELinear`: a drop-in for `nn.Linear` with E LoRA experts and a top-k router; the math
runs in `rocket.kernels.lora_moe` (fused Triton on CUDA, the torch reference on the CPU).
"""
from __future__ import annotations

import torch
from torch import nn
from rocket.kernels import reference
from rocket.kernels.lora_moe import lora_moe
from rocket.errors import MoEError



class LoraMoELinear(nn.Module):
    """y = base(x) + Σ_{(e,w) in topk(softmax(x Gᵀ))} w · s_e · B_e A_e dropout(x), w the chosen
    probabilities renormalised to sum 1 for top_k ≥ 2 and the probability itself for top_k = 1.

    base: the frozen nn.Linear (kept as `self.base`, its parameters get requires_grad=False).
    lora_A: [E, r, d_in], lora_B: [E, d_out, r] (become trainable parameters, base's dtype/device
    unless `dtype` is given); scaling: [E] (a float32 buffer, saved with the state); top_k ≤ E;
    router: an nn.Linear(d_in, E, bias=False) or None for a fresh one with N(0, router_std) weights
    drawn from a generator seeded with `seed`; dropout: on the expert input only (peft's
    lora_dropout). `load_balancing=True` sets `self.aux_loss` (Switch loss, reference
    `load_balancing_loss`, differentiable to router and input) on every forward; otherwise it stays
    None. `train_router_only=True` freezes the experts (see `set_train_router_only`). On CUDA the
    layer can be captured in a CUDA graph: `torch.cuda.make_graphed_callables` warms it up itself;
    before a raw `torch.cuda.graph` capture, call it once at that token count. Under `torch.compile`
    the layer runs as it is and the model around it is compiled. `gemm_backend` picks the GEMM of the
    fused layer (`rocket.kernels.lora_moe.lora_moe`'s argument of that name; "auto" by default).
    """

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling, top_k: int = 2,
                 router: nn.Linear | None = None, dropout: float = 0.0, *, router_std: float = 0.01, seed: int = 0,
                 load_balancing: bool = False, train_router_only: bool = False, dtype: torch.dtype | None = None,
                 gemm_backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise MoEError(f"LoraMoELinear: base must be an nn.Linear, got {type(base).__name__}")
        d_out, d_in = base.weight.shape
        if lora_A.dim() != 3 or lora_B.dim() != 3:
            raise MoEError(f"LoraMoELinear: lora_A must be [E, r, d_in] and lora_B [E, d_out, r], got "
                           f"{list(lora_A.shape)} and {list(lora_B.shape)}")
        E, r = lora_A.shape[0], lora_A.shape[1]
        if lora_A.shape[2] != d_in or lora_B.shape != (E, d_out, r):
            raise MoEError(f"LoraMoELinear: base is {d_in}→{d_out} but lora_A is {list(lora_A.shape)} and "
                           f"lora_B {list(lora_B.shape)} (expected [E, r, {d_in}] and [E, {d_out}, r])")
        scaling = torch.as_tensor(scaling, dtype=torch.float32).reshape(-1)
        if scaling.shape[0] != E:
            raise MoEError(f"LoraMoELinear: scaling has {scaling.shape[0]} entries for {E} experts")
        if not 1 <= int(top_k) <= E:
            raise MoEError(f"LoraMoELinear: top_k={top_k} must be in [1, {E}] (the number of experts)")
        if not 0.0 <= dropout < 1.0:
            raise MoEError(f"LoraMoELinear: dropout={dropout} must be in [0, 1)")
        self.base = base
        base.requires_grad_(False)
        dev, dtype = base.weight.device, dtype or base.weight.dtype
        self.lora_A = nn.Parameter(lora_A.detach().to(device=dev, dtype=dtype).contiguous().clone())
        self.lora_B = nn.Parameter(lora_B.detach().to(device=dev, dtype=dtype).contiguous().clone())
        self.register_buffer("scaling", scaling.to(dev))
        if router is None:
            router = nn.Linear(d_in, E, bias=False, device=dev, dtype=dtype)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                router.weight.copy_(torch.randn(E, d_in, generator=gen) * router_std)
        elif not isinstance(router, nn.Linear) or router.weight.shape != (E, d_in) or router.bias is not None:
            raise MoEError(f"LoraMoELinear: router must be nn.Linear({d_in}, {E}, bias=False)")
        self.router = router
        self.top_k = int(top_k)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.load_balancing = load_balancing
        self.gemm_backend = gemm_backend
        self.aux_loss: torch.Tensor | None = None
        self.set_train_router_only(train_router_only)

    # nn.Linear look-alike attributes, so code that inspects linears keeps working
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def n_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def set_train_router_only(self, flag: bool = True) -> None:
        """Router only (experts frozen) or experts + router (the default) trainable."""
        self.train_router_only = bool(flag)
        self.lora_A.requires_grad_(not flag)
        self.lora_B.requires_grad_(not flag)
        self.router.weight.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_lora = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        # float32 masters go in as they are: the fused layer rounds them to x's dtype in its kernels
        # (no cast nodes in the graph); the CPU reference computes in float32 anyway
        out = lora_moe(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                       self.router.weight, self.top_k, x_lora, return_routing=self.load_balancing,
                       gemm_backend=self.gemm_backend)
        if not self.load_balancing:
            if self.aux_loss is not None:  # nn.Module.__setattr__ costs host time on every call
                self.aux_loss = None
            return out
        y, probs, experts = out
        self.aux_loss = reference.load_balancing_loss(probs, experts, self.n_experts)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.n_experts}, "
                f"rank={self.rank}, top_k={self.top_k}, train_router_only={self.train_router_only}")
