"""Memory pre-flight for LoRA training: estimate the peak before the first step, refuse what cannot fit.

The estimate counts tensor bytes only (what `torch.cuda.max_memory_allocated` reports, or the growth of a
CPU process's resident memory from the moment before the model was built); the runtime itself (CUDA
context, Python, the torch libraries) is outside it, as it is outside `available_memory`.

    total = weights + gradients + optimizer + activations

- weights: every parameter and buffer as it sits in memory (numel · element size; the adapters included).
- gradients: trainable · 4 (fp32 gradients of the adapters).
- optimizer: trainable · 8 (AdamW's two fp32 moments).
- activations: what autograd keeps between forward and backward at its peak, counted tensor by tensor as
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1) do for
  a GPT layer (their s·b·h·(34 + 5·a·s/h) bytes at 16 bits, dropout masks included). Here the count is
  for a LoRA'd pre-norm decoder layer (Llama family; GPT-style layers differ in the MLP term) with a
  frozen base, where a frozen linear keeps nothing of its input and a LoRA A keeps its input.

Per layer, with T = batch·seq tokens, h hidden, kv the key/value width, I the MLP width, a heads, and
element widths p (the base's dtype), c (matmul dtype: the autocast dtype, else p), l (what a LoRA A
computes in: the autocast dtype, else the adapter's dtype, fp32 for a 16-bit base):

    norms          2 · T·h · 4            RMSNorm keeps its input upcast to fp32
    attention      T·(h + 2kv) · c        q, k, v kept by SDPA (eager: k, v repeated to h, plus
                   + T·h · c              the output;  a·s²·b·(4 + c) for fp32 softmax and its cast)
    gated MLP      3 · T·I · c            SiLU input, SiLU output, up projection
    LoRA inputs    T·d_in · l             for each distinct input of a targeted linear (of every linear
                                          when the weights themselves train); one copy per target when
                                          the input must be cast to l first or goes through LoRA
                                          dropout (+ its mask: 1 byte on CUDA, else p)
    cast weights   numel(W) · c           autocast's 16-bit copy of each frozen fp32 linear weight,
                                          kept for the backward of its input

plus, after the last layer, the final norm's input (T·h·4) and the loss. lorakit's loss (loss.py) sends a
frozen, bias-free head through a chunked cross-entropy, which keeps only the (T, h) gradient it forms in
the forward pass (T·h·c) and works on n = min(T, 2²²/V) rows at a time: a chunk's logits in c, their fp32
copy when c is 16-bit, and fp32 log-probabilities, plus the last chunk's log-probabilities while the next
is formed when there are several (n·V·(c + 4 + 4 [c < 4] + 4 [n < T])). A trainable or biased head goes
through plain cross-entropy, whose backward holds the fp32 log-softmax output, the incoming and the
outgoing gradient at once (3 · T·V · 4; the logits themselves are freed when the caller keeps only the
loss). The backward of one layer needs working space of about 2 · T·I · c; the larger of the two is added.

With gradient checkpointing a layer keeps only its input (T·h·p); one layer's activations exist again
while it is recomputed, so the peak is L · T·h·p + one layer + the larger working space.

LoRA's own rank-r intermediates (T·r per target) are left out. A model without a decoder config
(hidden size, layers) gets activations = 0. `decoder_activation_bytes` is the formula on sizes alone:
the pre-flight feeds it what it reads off a built model, `lorakit estimate` what it reads in a config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from lorakit.core.layers.linear import LoraLinear
from lorakit.errors import TrainError
from lorakit.train.loss import CHUNK_LOGITS, uses_chunked_head_loss

MARGIN = 0.10  # of the available memory, kept free for the allocator's fragmentation and the runtime

# The last name component of a targeted linear, by which tensor it reads (the attention's and the MLP's
# inputs are shared by several projections). `c_proj` and `dense` read the attention output under an
# attention module and the MLP hidden state elsewhere.
ATTENTION_INPUT = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "query", "key",
                   "value", "q", "k", "v", "in_proj"}
ATTENTION_OUTPUT = {"o_proj", "out_proj", "o", "Wo"}
MLP_INPUT = {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "w1", "w3", "wi",
             "wi_0", "wi_1"}
MLP_OUTPUT = {"down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "wo"}


@dataclass
class MemoryEstimate:
    """Peak training memory in bytes; `trainable` is part of `weights` and not added again to `total`."""

    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    total: int

    def describe(self) -> str:
        """E.g. '1.2 GB (weights 1.0 GB, gradients 8.4 MB, optimizer 16.8 MB, activations 180.2 MB)'."""
        parts = ", ".join(f"{name} {format_bytes(getattr(self, name))}"
                          for name in ("weights", "gradients", "optimizer", "activations"))
        return f"{format_bytes(self.total)} ({parts})"


def format_bytes(n: int | float) -> str:
    """Decimal units: '812.0 MB', '1.25 GB', '310 KB'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} KB"


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only transformer that activation memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_width: int  # key/value projection width: kv_heads · head_dim
    vocab: int

    @classmethod
    def from_config(cls, config) -> "DecoderShape | None":
        config = getattr(config, "text_config", None) or config  # multimodal wrappers

        def first(*names, default=None):
            return next((v for v in (getattr(config, n, None) for n in names) if v), default)

        hidden, layers = first("hidden_size", "n_embd", "d_model"), first("num_hidden_layers", "n_layer", "num_layers")
        if not hidden or not layers:
            return None
        heads = first("num_attention_heads", "n_head", "num_heads", default=1)
        head_dim = first("head_dim", default=hidden // heads)
        return cls(hidden=hidden, layers=layers, intermediate=first("intermediate_size", "n_inner", "ffn_dim",
                                                                    default=4 * hidden),
                   heads=heads, kv_width=first("num_key_value_heads", default=heads) * head_dim,
                   vocab=first("vocab_size", default=0))


def estimate_training_memory(model: nn.Module, *, trainable_params: int, batch_size: int, seq_len: int,
                             autocast_dtype: torch.dtype | None, gradient_checkpointing: bool) -> MemoryEstimate:
    """The peak memory of one optimizer step of LoRA training (see the module docstring for the formula)."""
    params = list(model.parameters())
    weights = sum(t.numel() * t.element_size() for t in params) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    trainable = [t for t in params if t.requires_grad]
    trainable_size = trainable[0].element_size() if trainable else 4
    shape = DecoderShape.from_config(getattr(model, "config", None))
    activations = 0 if shape is None else activation_bytes(model, shape, batch_size * seq_len, seq_len,
                                                          autocast_dtype, gradient_checkpointing)
    gradients, optimizer = trainable_params * 4, trainable_params * 8
    return MemoryEstimate(weights=weights, trainable=trainable_params * trainable_size, gradients=gradients,
                          optimizer=optimizer, activations=activations,
                          total=weights + gradients + optimizer + activations)


def activation_bytes(model: nn.Module, shape: DecoderShape, tokens: int, seq_len: int,
                     autocast_dtype: torch.dtype | None, gradient_checkpointing: bool) -> int:
    """Bytes autograd holds at the peak of forward + backward for `tokens` = batch · seq_len."""
    base_dtype = _base_dtype(model)
    eager = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") == "eager"
    cast_weights = _cast_weight_bytes(model, base_dtype, autocast_dtype)
    return decoder_activation_bytes(
        shape, tokens=tokens, seq_len=seq_len, stored_size=base_dtype.itemsize,
        compute_size=(autocast_dtype or base_dtype).itemsize, eager=eager,
        gated=any(name.rsplit(".", 1)[-1] in ("gate_proj", "gate_up_proj", "w3") for name, _ in model.named_modules()),
        kept_inputs=kept_input_bytes(_lora_inputs(model, base_dtype, autocast_dtype), tokens, eager),
        cast_weights=cast_weights["layers"], cast_head=cast_weights["head"],
        chunked_loss=uses_chunked_head_loss(model), gradient_checkpointing=gradient_checkpointing)


def decoder_activation_bytes(shape: DecoderShape, *, tokens: int, seq_len: int, stored_size: int, compute_size: int,
                             eager: bool, gated: bool, kept_inputs: int, cast_weights: int = 0, cast_head: int = 0,
                             chunked_loss: bool, extra_work: int = 0, gradient_checkpointing: bool) -> int:
    """The module docstring's formula. Sizes are bytes per element: `stored_size` p (the base's dtype),
    `compute_size` c (the matmuls'); `kept_inputs` and `cast_weights` are totals over all layers, and
    `extra_work` is working space a layer's backward needs beyond 2·T·I·c (a dequantized weight, say)."""
    T, h, kv, I, L = tokens, shape.hidden, shape.kv_width, shape.intermediate, shape.layers
    p, c = stored_size, compute_size
    batch, heads = T // seq_len, shape.heads

    norms = 2 * T * h * 4
    if eager:  # q, k, v repeated to all heads, softmax probabilities in fp32 plus their cast for @ v
        attention = 3 * T * h * c + batch * heads * seq_len ** 2 * (4 + (c if c != 4 else 0))
    else:  # SDPA keeps q, k, v and its output; softmax statistics only (b·a·s floats)
        attention = T * (h + 2 * kv) * c + T * h * c + batch * heads * seq_len * 4
    mlp = (3 if gated else 1) * T * I * c
    per_layer = norms + attention + mlp + (kept_inputs + cast_weights) // L

    loss_kept, loss_work = loss_bytes(T, shape.vocab, h, c, chunked_loss)
    tail = T * h * 4 + cast_head + loss_kept  # final norm input; the output head's cast weight; the loss's
    layer_work = 2 * T * I * c + extra_work
    if gradient_checkpointing:
        return L * T * h * p + tail + max(loss_work, per_layer + layer_work)
    return L * per_layer + tail + max(loss_work, layer_work)


def loss_bytes(tokens: int, vocab: int, hidden: int, compute_size: int, chunked: bool) -> tuple[int, int]:
    """(bytes kept from the forward to the backward, working space at the loss's peak) of the next-token
    loss over `tokens` positions (see the module docstring)."""
    if chunked:
        rows = min(tokens, max(1, CHUNK_LOGITS // max(vocab, 1)))
        per_logit = compute_size + 4 + (4 if compute_size < 4 else 0) + (4 if rows < tokens else 0)
        return tokens * hidden * compute_size, rows * vocab * per_logit
    return 0, 3 * tokens * vocab * 4


def _base_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype holding most of the frozen parameters (what the activations are computed in)."""
    counts: dict[torch.dtype, int] = {}
    for t in model.parameters():
        if t.is_floating_point() and not t.requires_grad:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


@dataclass(frozen=True)
class KeptInput:
    """The input one linear layer keeps for its weight's gradient (a LoRA A's, or a trainable weight's)."""

    parent: str        # the module holding the linear: linears of one parent reading one tensor share it
    group: str         # the tensor it reads (`input_group`)
    in_features: int
    size: int          # element size it is kept in
    source_size: int   # element size it arrives in; another size means a cast copy of its own
    mask_size: int = 0  # LoRA dropout's mask element size (dropout also means a copy of its own); 0 = none


def input_group(name: str) -> str:
    """Which tensor the linear called `name` reads: "attention input", "attention output", "mlp input",
    "mlp hidden", or, for a name these lists do not know, the name itself (a tensor of its own)."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    in_attention = any(word in parent for word in ("attn", "attention"))
    if leaf in ATTENTION_INPUT:
        return "attention input"
    if leaf in ATTENTION_OUTPUT or (leaf in ("c_proj", "dense") and in_attention):
        return "attention output"
    if leaf in MLP_INPUT:
        return "mlp input"
    if leaf in MLP_OUTPUT or leaf in ("c_proj", "dense"):
        return "mlp hidden"
    return name


def kept_input_bytes(inputs: list[KeptInput], tokens: int, eager: bool) -> int:
    """Bytes of the inputs kept for weight gradients, over all of `inputs`.

    Linears reading the same tensor share it when it needs no cast; a cast (to the autocast dtype, or to
    fp32 adapters beside a 16-bit base) makes one copy per linear, and so does LoRA dropout, which also
    keeps its mask. Under SDPA the attention output is already kept by the attention itself.
    """
    total = 0
    shared: set[tuple[str, str]] = set()  # (parent module, group) whose input is already counted
    for kept in inputs:
        size = tokens * kept.in_features * kept.size
        if kept.mask_size:
            total += tokens * kept.in_features * kept.mask_size
        if kept.mask_size or kept.size != kept.source_size:
            total += size
        elif kept.group == "attention output" and not eager:
            continue  # the SDPA output, kept by the attention already
        elif (kept.parent, kept.group) not in shared:
            shared.add((kept.parent, kept.group))
            total += size
    return total


def _lora_inputs(model: nn.Module, base_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> list[KeptInput]:
    """The inputs every trainable LoRA A of `model` keeps; an input produced inside the layer (attention
    output, MLP hidden state) arrives in the compute dtype, the others in the base's."""
    inputs = []
    for name, module in model.named_modules():
        adapter = getattr(module, "active_adapter", None)
        if not isinstance(module, LoraLinear) or adapter not in module.lora_A:
            continue
        a = module.lora_A[adapter]
        if not a.requires_grad:
            continue
        group = input_group(name)
        inner = group in ("attention output", "mlp hidden")
        source_dtype = (autocast_dtype or base_dtype) if inner else base_dtype
        mask = 0  # the mask: bool from CUDA's fused kernel, the input's dtype elsewhere
        if module.dropout_p.get(adapter, 0.0) > 0:
            mask = 1 if a.device.type == "cuda" else source_dtype.itemsize
        inputs.append(KeptInput(parent=name.rsplit(".", 1)[0] if "." in name else "", group=group,
                                in_features=module.in_features, size=(autocast_dtype or a.dtype).itemsize,
                                source_size=source_dtype.itemsize, mask_size=mask))
    return inputs


def _cast_weight_bytes(model: nn.Module, base_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> dict:
    """Autocast's lower-precision copies of frozen linear weights, kept for the backward (only frozen leaf
    weights are re-cast on every call: autocast caches casts of trainable ones)."""
    out = {"layers": 0, "head": 0}
    if autocast_dtype is None or autocast_dtype.itemsize >= base_dtype.itemsize:
        return out
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) and not weight.requires_grad and weight.is_floating_point()
                and weight.dtype.itemsize > autocast_dtype.itemsize):
            out["head" if module is head else "layers"] += weight.numel() * autocast_dtype.itemsize
    return out


def available_memory(device: torch.device | str) -> int:
    """Bytes free for tensors on `device`: CUDA's free memory, or on CPU the system's available memory capped
    by the tightest cgroup limit above this process (limit − usage + reclaimable file cache)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = psutil.virtual_memory().available
    cgroup = _cgroup_available()
    return min(available, cgroup) if cgroup is not None else available


def _cgroup_available(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """min over this process's memory cgroup and its ancestors of (limit − usage + inactive file cache);
    None when no limit is set. cgroup v2 (memory.max) and v1 (memory.limit_in_bytes)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            free = _cgroup_free(folder, *files)
            if free is not None:
                best = free if best is None else min(best, free)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return best


def _cgroup_free(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit_text = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or int(limit_text) >= 1 << 60:  # v1 spells "no limit" as a huge number
        return None
    inactive = 0
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return max(0, int(limit_text) - usage + inactive)


def preflight(estimate: MemoryEstimate, available: int) -> None:
    """Raise TrainError when the estimate does not fit in `available` bytes less a 10% margin."""
    usable = int(available * (1 - MARGIN))
    if estimate.total <= usable:
        return
    raise TrainError(
        f"training needs an estimated {estimate.describe()}, but only {format_bytes(available)} is available "
        f"({format_bytes(usable)} after a {MARGIN:.0%} margin); try a smaller --batch-size, a shorter "
        f"--max-length, --gradient-checkpointing, or --quantize nf4 for the frozen base")
