"""FAISS, the optional dependency of the augment stage: import with a clear error, GPU placement."""
from __future__ import annotations
from rocket.errors import AugmentError



# --------------------------------------------------------------------------- retrieval
def _faiss():
    try:
        import faiss
    except ImportError:
        raise AugmentError("data selection needs the package faiss-cpu (pip install 'rocket[augment]')") from None
    return faiss


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _on_gpu(index, use_gpu: bool):
    """The index moved to GPU 0 when asked and faiss has GPU support, else the index itself."""
    if not (use_gpu and faiss_has_gpu()):
        return index
    faiss = _faiss()
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)  # keeps its resources alive
