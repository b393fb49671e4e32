"""How much memory fine-tuning and serving a model takes, from its sizes alone.

Training peak = weights + gradients + optimizer + activations, in bytes, with P the model's parameters,
N the trainable ones, Q the weight elements of the decoder layers' linears, w the bytes of --dtype (bf16 2,
fp32 4) and a those of --adapter-dtype:

    method  weights                          gradients  optimizer (AdamW: two fp32 moments, 8 per param)
    full    P·w                              P·w        8·P, + 4·P fp32 master weights when w = 2
    lora    P·w + N·a                        N·a        8·N  (16-bit adapters are updated in place, as the
                                                              QLoRA code does: no master copy)
    qlora   Q·4.127/8 + (P − Q)·w + N·a      N·a        8·N

QLoRA stores each decoder-layer linear weight in NF4 with double quantization: 4 bits, plus an fp8
scale per block of 64 and an fp32 scale per 256 blocks, 4 + 8/64 + 32/(64·256) = 4.127 bits a weight
(QLoRA §3); embeddings, output head, norms and biases stay in w. `--optimizer sgd` (no momentum) keeps no
state: optimizer = the master weights only.

Activations are `lorakit.train.memory.decoder_activation_bytes`, the formula `lorakit train`'s pre-flight
uses (see its docstring), for T = batch · max_length tokens computed in w: per layer the two norms'
fp32 inputs, q, k, v and the attention output (eager attention: the fp32 softmax probabilities and their
16-bit copy, batch·heads·max_length² each, instead), the MLP's SiLU input, SiLU output and up projection
(gpt2: the GELU input), and the inputs the trained matrices keep for their gradients (LoRA: those of the
targets; full: those of every linear, and the head's); then the final norm's input and the loss (LoRA and
QLoRA of a llama-style model: lorakit's chunked loss over a frozen head; a full fine-tune or a gpt2-style
model: plain cross-entropy over all T·V logits, 3·T·V·4).
With --gradient-checkpointing a layer keeps only its input and one layer is recomputed at a time. QLoRA
adds one dequantized weight (its largest, in w) to a layer's backward working space. No framework overhead
is added: the figures are tensor bytes, what `torch.cuda.max_memory_allocated` reports (the CUDA context and
the allocator's slack, typically 0.5-1 GB on a GPU, come on top).

Inference = weights (an adapter kept beside its base in w) + the KV cache for the batch at full length,
2 · L · kv_heads · head_dim · w bytes per token per sequence; a forward pass's transient working space is
left out. The saved files are counted in 16 bits: an adapter's N·2 bytes (the LoRA paper's "35MB" is fp16;
`lorakit train` saves fp32 adapters, twice that), a full fine-tune's P·2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorakit.estimate.architecture import Architecture, resolve_targets
from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig
from lorakit.train.memory import DecoderShape, KeptInput, decoder_activation_bytes, input_group, kept_input_bytes

METHODS = ("full", "lora", "qlora")
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZERS = ("adamw", "sgd")
ATTENTIONS = ("sdpa", "eager")
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)   # = 4.127: NF4 weights, fp8 block scales, fp32 scales of those
FILE_BYTES = 2                              # a saved checkpoint's element: fp16 or bf16

_TRAIN_DEFAULTS = TrainConfig()


@dataclass(frozen=True)
class Setup:
    """What is trained and how; the defaults are `lorakit train`'s."""

    method: str = "lora"
    r: int = _TRAIN_DEFAULTS.r
    target_modules: object = _TRAIN_DEFAULTS.target_modules   # "all-linear" or a list of names
    batch_size: int = _TRAIN_DEFAULTS.batch_size
    max_length: int = _TRAIN_DEFAULTS.max_length
    gradient_checkpointing: bool = False
    dtype: str = "bf16"            # weights and compute
    adapter_dtype: str = "fp32"    # LoRA adapters and their gradients (lorakit train keeps them in fp32)
    optimizer: str = "adamw"
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("r", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number; got {value!r}")
        for name, allowed in (("method", METHODS), ("dtype", DTYPE_BYTES), ("adapter_dtype", DTYPE_BYTES),
                              ("optimizer", OPTIMIZERS), ("attention", ATTENTIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, name)!r}")


@dataclass
class Footprint:
    """Counts and bytes for one architecture and setup."""

    parameters: int
    trainable: int
    quantized: int                 # weights stored in NF4 (qlora), else 0
    targets: list[str]             # adapted matrices, named as within a layer (empty for full)
    adapter_file: int | None       # N·2 bytes; None for a full fine-tune
    model_file: int                # P·2 bytes
    training: dict = field(default_factory=dict)    # weights, gradients, optimizer, activations, total
    inference: dict = field(default_factory=dict)   # weights, kv_cache, total


def estimate(arch: Architecture, setup: Setup) -> Footprint:
    if arch.positions and setup.max_length > arch.positions:
        raise ConfigError(f"--max-length {setup.max_length} is past the {arch.positions} learned positions of "
                          f"{arch.source}")
    w, a = DTYPE_BYTES[setup.dtype], DTYPE_BYTES[setup.adapter_dtype]
    P = arch.parameters
    targets = [] if setup.method == "full" else resolve_targets(arch, setup.target_modules)
    N = P if setup.method == "full" else arch.layers * sum(t.lora_params(setup.r) for t in targets)
    Q = arch.layer_linear_weights if setup.method == "qlora" else 0
    base = math.ceil(Q * NF4_BITS / 8) + (P - Q) * w
    moments = 8 * N if setup.optimizer == "adamw" else 0

    if setup.method == "full":
        weights, gradients, optimizer = P * w, P * w, moments + (4 * P if w < 4 else 0)
    else:
        weights, gradients, optimizer = base + N * a, N * a, moments
    activations = _activations(arch, setup, targets)
    training = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
                "total": weights + gradients + optimizer + activations}

    kv_cache = 2 * arch.layers * arch.kv_heads * arch.head_dim * w * setup.batch_size * setup.max_length
    served = base + (0 if setup.method == "full" else N * w)
    inference = {"weights": served, "kv_cache": kv_cache, "total": served + kv_cache}
    return Footprint(parameters=P, trainable=N, quantized=Q, targets=[t.name for t in targets],
                     adapter_file=None if setup.method == "full" else N * FILE_BYTES, model_file=P * FILE_BYTES,
                     training=training, inference=inference)


def _activations(arch: Architecture, setup: Setup, targets) -> int:
    w = DTYPE_BYTES[setup.dtype]
    tokens = setup.batch_size * setup.max_length
    shape = DecoderShape(hidden=arch.hidden, layers=arch.layers, intermediate=arch.intermediate, heads=arch.heads,
                         kv_width=arch.kv_heads * arch.head_dim, vocab=arch.vocab)
    if setup.method == "full":  # every linear keeps its input, and so does the head
        kept = [(m.name, m.d_in) for m in arch.linears]
        head_input = tokens * arch.hidden * w
    else:
        kept = [(t.name, t.d_in) for t in targets]
        head_input = 0
    inputs = [KeptInput(parent=name.rsplit(".", 1)[0], group=input_group(name), in_features=d_in, size=w,
                        source_size=w) for name, d_in in kept]
    per_layer = kept_input_bytes(inputs, tokens, eager=setup.attention == "eager")
    dequantized = max(m.d_in * m.d_out for m in arch.linears) * w if setup.method == "qlora" else 0
    return decoder_activation_bytes(
        shape, tokens=tokens, seq_len=setup.max_length, stored_size=w, compute_size=w,
        eager=setup.attention == "eager", gated=arch.layout == "llama",
        kept_inputs=arch.layers * per_layer + head_input, chunked_loss=_chunked_loss(arch, setup),
        extra_work=dequantized, gradient_checkpointing=setup.gradient_checkpointing)


def _chunked_loss(arch: Architecture, setup: Setup) -> bool:
    """Whether lorakit's loss takes its chunked path: a frozen head (not a full fine-tune) of a model whose
    decoder sits at `.model`, as llama-style ones do (gpt2's sits at `.transformer`)."""
    return setup.method != "full" and arch.layout == "llama"
