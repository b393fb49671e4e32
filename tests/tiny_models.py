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


CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_tokenizer(add_bos: bool = False):
    """A byte-level BPE tokenizer shaped like the embedded base model's: ChatML template, EOS "<|endoftext|>",
    pad "<|pad|>", special "<|im_start|>" / "<|im_end|>". Trained in-process on a few sentences (a few ms),
    so it is the same on every call. `add_bos` makes it prepend "<|endoftext|>" to every encoded text, like
    tokenizers that add a BOS of their own.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["What is two plus two? The answer is four.", "You are a helpful assistant.",
              "user\nassistant\nsystem\n", "Translate to French: hello world. Bonjour le monde."] * 4
    backend.train_from_iterator(corpus, trainer=trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=CHATML_TEMPLATE)


def chat_llama(tokenizer, seed: int = 0, **config):
    """A tiny Llama (hidden 32, 2 layers, GQA, 128 positions unless `config` says otherwise) for `tokenizer`."""
    torch.manual_seed(seed)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128) | config
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **shape)).eval()


def save_tiny_llama_folder(folder, seed: int = 0, max_positions: int = 256):
    """A tiny Llama (hidden 32, 2 layers, GQA) and its ChatML tokenizer saved as a Hugging Face model folder."""
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
