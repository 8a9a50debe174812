"""Triton kernels of rocket (installed as `rocket.kernels`) and their plain-torch references."""
import os


def use_triton(*tensors) -> bool:
    """The dispatch rule (docs/design.md): CUDA tensors take the Triton kernels, CPU tensors the torch
    reference, except under TRITON_INTERPRET=1 where the Triton kernels run on the CPU (tests)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return all(t.is_cuda for t in tensors if t is not None)
