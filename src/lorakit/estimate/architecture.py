"""A decoder's sizes from its config.json alone, and what they add up to: parameters and LoRA targets.

No weights are read and no model is built, so a 175B model is counted as fast as a tiny one. Two layer
layouts are known:

    llama   (llama, mistral, qwen2, qwen3)  q_proj, k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj;
            two RMSNorms per layer, rotary positions, grouped-query attention (num_key_value_heads)
    gpt2    (gpt2; GPT-3 is a gpt2-style config)  attn.c_attn (q, k and v fused, h -> 3h), attn.c_proj;
            mlp.c_fc, mlp.c_proj; two LayerNorms per layer, learned positions, biases everywhere

Parameters, with h hidden, L layers, V vocabulary, P learned positions:

    embeddings V·h (+ P·h)  +  output head V·h unless tied  +  final norm
    + L · (Σ over the layer's linears of d_in·d_out + bias  +  its norms)

A LoRA adapter on a d_in -> d_out matrix trains r·(d_in + d_out) parameters. The LoRA paper adapts GPT-3's
W_q and W_v as separate h x h matrices, so for the gpt2 layout `q`, `k` and `v` name the thirds of c_attn
(c_attn itself is one h -> 3h matrix: r·4h). A config of another model type is read with the llama layout
when it has the llama fields (and the report says the layout was assumed); a config lacking the fields a
layout needs is refused with their names.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ModelError, TargetError

PRESETS = Path(__file__).resolve().parent / "presets"
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GPT2_TYPES = ("gpt2",)
ALL_LINEAR = "all-linear"

# What each layout needs, in its config's own names.
REQUIRED = {
    "llama": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
    "gpt2": ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"),
}
# Short names for a layer's linears; in the gpt2 layout q, k and v are the thirds of c_attn.
ALIASES = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"},
    "gpt2": {"o": "attn.c_proj"},
}


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer, named as within the layer (`self_attn.q_proj`, `mlp.c_fc`)."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False


@dataclass(frozen=True)
class Architecture:
    source: str            # what --model named: a preset, a path, a hub id
    model_type: str
    layout: str            # "llama" or "gpt2"
    assumed: bool          # the layout is assumed for a model type not in LLAMA_TYPES / GPT2_TYPES
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    positions: int         # learned position embeddings (gpt2); 0 for rotary positions
    tied: bool             # the output head shares the input embedding
    attention_bias: bool = False
    output_bias: bool = False   # o_proj's bias (llama's attention_bias; qwen2 has q, k, v biases only)
    mlp_bias: bool = False
    qk_norm: bool = False       # qwen3: RMSNorm over each head's q and k

    @property
    def linears(self) -> tuple[Linear, ...]:
        h, q, kv, inter = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        if self.layout == "gpt2":
            return (Linear("attn.c_attn", h, 3 * h, True), Linear("attn.c_proj", h, h, True),
                    Linear("mlp.c_fc", h, inter, True), Linear("mlp.c_proj", inter, h, True))
        bias, mlp = self.attention_bias, self.mlp_bias
        return (Linear("self_attn.q_proj", h, q, bias), Linear("self_attn.k_proj", h, kv, bias),
                Linear("self_attn.v_proj", h, kv, bias), Linear("self_attn.o_proj", q, h, self.output_bias),
                Linear("mlp.gate_proj", h, inter, mlp), Linear("mlp.up_proj", h, inter, mlp),
                Linear("mlp.down_proj", inter, h, mlp))

    @property
    def norm_params_per_layer(self) -> int:
        if self.layout == "gpt2":
            return 2 * 2 * self.hidden                       # two LayerNorms, weight and bias
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.positions * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def layer_linear_weights(self) -> int:
        """Weight elements of every layer's linears, over all layers (what QLoRA stores in 4 bits)."""
        return self.layers * sum(m.d_in * m.d_out for m in self.linears)

    @property
    def parameters(self) -> int:
        final_norm = 2 * self.hidden if self.layout == "gpt2" else self.hidden
        biases = sum(m.d_out for m in self.linears if m.bias)
        return (self.embedding_params + self.head_params + final_norm + self.layer_linear_weights
                + self.layers * (biases + self.norm_params_per_layer))

    def describe(self) -> str:
        """E.g. 'gpt2-style decoder: 96 layers, hidden 12288, 96 heads, vocabulary 50257'."""
        layout = f"{self.layout}-style" + (f" (assumed for model type {self.model_type!r})" if self.assumed else "")
        heads = f"{self.heads} heads" + (f" ({self.kv_heads} key/value)" if self.kv_heads != self.heads else "")
        return (f"{layout} decoder: {self.layers} layers, hidden {self.hidden}, {heads}, MLP {self.intermediate}, "
                f"vocabulary {self.vocab}{', tied head' if self.tied else ''}")


@dataclass(frozen=True)
class Target:
    """A matrix LoRA adapts, once per layer."""

    name: str
    d_in: int
    d_out: int

    def lora_params(self, r: int) -> int:
        return r * (self.d_in + self.d_out)


def resolve_targets(arch: Architecture, target_modules) -> list[Target]:
    """The matrices `target_modules` ("all-linear" or a list of names) picks in one layer.

    A name matches a linear whose name within the layer equals it or ends with "." + name, as PEFT matches
    module names; short names (q, v, gate, ...) are accepted too."""
    linears = arch.linears
    if target_modules in (ALL_LINEAR, [ALL_LINEAR], (ALL_LINEAR,)):
        return [Target(m.name, m.d_in, m.d_out) for m in linears]
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen: dict[str, Target] = {}
    for entry in names:
        entry = ALIASES[arch.layout].get(entry, entry)
        if arch.layout == "gpt2" and entry in ("q", "k", "v", "attn.q", "attn.k", "attn.v"):
            third = entry.rsplit(".", 1)[-1]
            chosen[f"attn.{third}"] = Target(f"attn.{third}", arch.hidden, arch.hidden)  # a third of c_attn
            continue
        matched = [m for m in linears if m.name == entry or m.name.endswith("." + entry)]
        if not matched:
            short = ["q", "k", "v"] if arch.layout == "gpt2" else list(ALIASES["llama"])
            known = [m.name for m in linears] + (["q, k, v (thirds of attn.c_attn)"] if arch.layout == "gpt2"
                                                else [", ".join(short)])
            leaves = list(dict.fromkeys(m.name.rsplit(".", 1)[-1] for m in linears))
            stem = entry.rsplit(".", 1)[-1].removesuffix("_proj")
            close = [stem] if stem in short else difflib.get_close_matches(entry, leaves, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise TargetError(f"target module {entry!r} is not a linear layer of {arch.source} "
                              f"({arch.layout}-style layers have {', '.join(known)}){hint}")
        chosen.update((m.name, Target(m.name, m.d_in, m.d_out)) for m in matched)
    if "attn.c_attn" in chosen and any(f"attn.{x}" in chosen for x in "qkv"):
        raise TargetError("target modules name both attn.c_attn and its thirds (q, k, v); choose one")
    return list(chosen.values())


# --- reading a config ------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def read_architecture(model: str | None) -> Architecture:
    """The Architecture of --model: the embedded model (None), a preset name, a config.json, a model folder,
    or a hub id (only its config.json is fetched)."""
    from lorakit.models import resolve_model_path

    if model is None or model in ("embedded", "lorakit-embedded"):
        folder = Path(resolve_model_path(None))
        return architecture_from_config(_read_json(folder / "config.json"), "the embedded model")
    path = Path(model).expanduser()
    if path.is_file():
        return architecture_from_config(_read_json(path), str(path))
    if path.is_dir():
        return architecture_from_config(_read_json(Path(resolve_model_path(path)) / "config.json"), str(path))
    if (PRESETS / f"{model}.json").is_file():
        return architecture_from_config(_read_json(PRESETS / f"{model}.json"), model)
    try:
        hub_id = resolve_model_path(model)
    except ModelError:
        raise ModelError(f"model {model!r} not found: no such file or folder, not a preset "
                         f"({', '.join(preset_names())}), and not a hub id (owner/name)") from None
    return architecture_from_config(_hub_config(hub_id), hub_id)


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: a config.json holds a JSON object; this holds {type(config).__name__}")
    return config


def _hub_config(hub_id: str) -> dict:
    """config.json of a hub model (transformers fetches that one file, no weights)."""
    from transformers import AutoConfig

    from lorakit.models.hub import HubUnreachableError, from_hub

    try:
        return from_hub(hub_id, lambda local: AutoConfig.from_pretrained(hub_id, local_files_only=local)).to_dict()
    except HubUnreachableError:
        raise
    except Exception as exc:  # missing repo, gated repo, unknown model type: all said the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot fetch the config of {hub_id!r} from the Hugging Face hub: {first}") from None


def architecture_from_config(config: dict, source: str) -> Architecture:
    """Read the sizes the counts need; ModelError naming the fields a config lacks or holds badly."""
    config = config.get("text_config") or config   # multimodal wrappers keep the decoder's sizes here
    model_type = str(config.get("model_type") or "")
    if model_type in GPT2_TYPES + LLAMA_TYPES:
        layout, assumed = ("gpt2" if model_type in GPT2_TYPES else "llama"), False
    else:
        layout, assumed = ("gpt2" if any(key in config for key in ("n_embd", "n_layer", "n_head")) else "llama"), True
    missing = [key for key in REQUIRED[layout] if config.get(key) is None]
    if missing and assumed:
        kind = f"model type {model_type!r}" if model_type else "a config with no model_type"
        raise ModelError(f"{source}: {kind} is not one lorakit estimate knows ({', '.join(LLAMA_TYPES + GPT2_TYPES)}), "
                         f"and reading it as {layout}-style needs {', '.join(missing)}, which it lacks")
    if missing:
        raise ModelError(f"{source}: a {model_type} config needs {', '.join(missing)} to count parameters; "
                         f"it lacks {'it' if len(missing) == 1 else 'them'}")

    def size(key: str, default: int | None = None) -> int:
        value = config.get(key)
        if value is None:
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelError(f"{source}: {key} must be a positive whole number; got {value!r}")
        return value

    if layout == "gpt2":
        hidden = size("n_embd")
        heads = size("n_head")
        return Architecture(source=source, model_type=model_type or "gpt2", layout=layout, assumed=assumed,
                            hidden=hidden, layers=size("n_layer"), heads=heads, kv_heads=heads,
                            head_dim=hidden // heads, intermediate=size("n_inner", 4 * hidden),
                            vocab=size("vocab_size"), positions=size("n_positions"),
                            tied=bool(config.get("tie_word_embeddings", True)),
                            attention_bias=True, output_bias=True, mlp_bias=True)
    hidden, heads = size("hidden_size"), size("num_attention_heads")
    bias = bool(config.get("attention_bias", model_type == "qwen2"))  # qwen2's q, k, v always have biases
    return Architecture(source=source, model_type=model_type or "unknown", layout=layout, assumed=assumed,
                        hidden=hidden, layers=size("num_hidden_layers"), heads=heads,
                        kv_heads=size("num_key_value_heads", heads), head_dim=size("head_dim", hidden // heads),
                        intermediate=size("intermediate_size"), vocab=size("vocab_size"), positions=0,
                        tied=bool(config.get("tie_word_embeddings", False)), attention_bias=bias,
                        output_bias=bias and model_type != "qwen2", mlp_bias=bool(config.get("mlp_bias", False)),
                        qk_norm=model_type == "qwen3")
