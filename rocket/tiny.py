"""Tiny, locally built models for the demo and the tests: no download ever.

A byte-level BPE tokenizer trained on given texts, a random-init Llama built from a config, and
random peft LoRA adapters saved in peft's own format.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE tokenizer (no unknown bytes) trained on `texts`, deterministic, with
    <s>/</s>/<pad>/<unk>, BOS prepended, and a simple chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, max_positions: int = 1024, seed: int = 0, dtype=torch.float32):
    """A random-init LlamaForCausalLM of the given size, its vocabulary matching `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def make_random_adapter(model, out_dir: str | Path, r: int = 8, alpha: float = 16,
                        target_modules=("q_proj", "v_proj"), use_rslora: bool = False, seed: int = 0,
                        std: float = 0.05, layers=None) -> Path:
    """Save a peft LoRA adapter of `model` with random A and B (both non-zero) to out_dir."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), use_rslora=use_rslora,
                     lora_dropout=0.0, init_lora_weights=False, layers_to_transform=layers,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    return out_dir
