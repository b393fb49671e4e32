"""Tiny random transformers models (a few hundred KB each), built in-process: nothing is downloaded.

Each builder returns (model in eval mode, example inputs as kwargs). The same seed gives the same
weights, so two calls build two identical models (one for lorakit, one for PEFT).
"""

from __future__ import annotations

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration, ViTConfig, ViTForImageClassification)


def llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    inputs = {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))}
    return LlamaForCausalLM(config).eval(), inputs


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    inputs = {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))}
    return GPT2LMHeadModel(config).eval(), inputs


def t5(seed: int = 0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0)
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, 128, (2, 9), generator=gen),
              "decoder_input_ids": torch.randint(0, 128, (2, 5), generator=gen)}
    return T5ForConditionalGeneration(config).eval(), inputs


def vit(seed: int = 0):
    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=3)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    return ViTForImageClassification(config).eval(), inputs


BUILDERS = {"llama": llama, "gpt2": gpt2, "t5": t5, "vit": vit}

# The attention projections each architecture calls q and v (the LoRA paper's choice).
QV_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "t5": ["q", "v"], "vit": ["q_proj", "v_proj"]}


def output_of(model, inputs) -> torch.Tensor:
    """The model's main output tensor (logits) for `inputs`, without gradients."""
    with torch.no_grad():
        return model(**inputs).logits
