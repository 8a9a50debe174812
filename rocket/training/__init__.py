"""Stage 4 (train): the LoRA mixture of experts trained on K-shot + selected data (torch or DeepSpeed)."""
from rocket.training.config import TrainConfig, TrainResult
from rocket.training.loop import train

__all__ = ["TrainConfig", "TrainResult", "train"]
