"""The LoRA mixture of experts: the layer, its injection into HF models, its saved state."""
from rocket.moe.layer import LoraMoELinear
from rocket.moe.inject import inject_lora_moe, moe_aux_loss, moe_layers, set_train_router_only
from rocket.moe.state import load_moe, load_moe_state, save_moe, save_moe_state

__all__ = ["LoraMoELinear", "inject_lora_moe", "load_moe", "load_moe_state", "moe_aux_loss", "moe_layers", "save_moe",
           "save_moe_state", "set_train_router_only"]
