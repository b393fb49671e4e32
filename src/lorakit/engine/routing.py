"""Routing by prompt: which adapter's domain a prompt belongs to, from the base model's own hidden states.

An adapter's routing signature summarises its training prompts as the base model sees them. With
h(p) = mean over the prompt's tokens of the base model's hidden state at layer L (H,):

    mean        μ = mean of h over the fitting prompts                              (H,)
    directions  P = the top k principal directions of h − μ (orthonormal rows)      (k, H), k <= min(128, H/2)
    radius      ρ = the 99th percentile of the residual r(h) over calibration prompts, where
                r(h) = ||(h − μ) − Pᵀ P (h − μ)||: the distance from the prompts' affine subspace

Every fifth prompt calibrates and is left out of μ and P, so ρ is measured on prompts the fit did not see.
A prompt's score for an adapter is

    z = r(h(prompt)) / ρ        score = exp(−z² / 2)

1 on the subspace, 0.61 at the radius that holds 99% of the adapter's own prompts, 0.14 at twice it.
Prompts of one domain vary along the directions of the words they are about and share the rest (the
task's wording), so a prompt of another domain lies off the subspace even where its words are alike: with
enough directions to hold the words' variation (16 could not tell "Count the words: ..." from "Reverse
the words: ...", one token apart; 128 do, docs/routing.md), what is left measures the wording.
The route is the candidate with the highest score; below the threshold (DEFAULT_THRESHOLD, calibrated on
the example skills, docs/routing.md) the base model serves.

L = 0 is the token embeddings (hidden_states[0] in transformers): the first thing a prefill computes,
so a route costs a lookup, a mean and k·H multiply-adds per candidate. L >= 1 runs the base model's
first L layers on the prompt (the adapter's own prefill cannot be reused: its LoRA changes every layer
it targets), about L / num_layers of a prefill; L = num_layers is the final, normed state.

The signature is stored beside the adapter as `routing_signature.safetensors` (fp16 tensors `mean` and
`directions`; metadata format, layer, radius, prompts, base), a file PEFT and vLLM do not read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorakit.engine.adapter_cache import AdapterInfo
from lorakit.errors import AdapterFileError, DataError
from lorakit.io.safetensors_file import atomic_write

log = logging.getLogger("lorakit.engine")

ROUTING_FILE = "routing_signature.safetensors"
SIGNATURE_FORMAT = "lorakit-routing/1"
ROUTE_MODEL = "auto"        # the model name that asks for a route
DEFAULT_THRESHOLD = 0.4     # score; z <= 1.35 (docs/routing.md: how it was calibrated)
DEFAULT_LAYER = 0
DIRECTIONS = 128            # at most; and at most half the width, so the residual keeps the other half
RADIUS_QUANTILE = 0.99
CALIBRATE_EVERY = 5         # every fifth prompt calibrates the radius
MAX_PROMPTS = 2000          # a signature is fitted on at most this many prompts, spread over the data
BATCH = 16
STORED_DTYPE = torch.float16
MAX_STACKS = 256            # candidate sets whose stacked signatures a Router keeps


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a Router keys its stacks by them
class RoutingSignature:
    """One adapter's prompt domain (see the module docstring); tensors in fp32 as stored (fp16-rounded)."""

    mean: torch.Tensor         # (H,)
    directions: torch.Tensor   # (k, H)
    radius: float
    layer: int
    prompts: int
    base: Optional[str] = None

    def distance(self, pooled: np.ndarray) -> np.ndarray:
        """z = r / ρ of each pooled state (n, H) -> (n,)."""
        return SignatureStack([self]).distances(pooled)[:, 0]

    def save(self, folder) -> Path:
        path = Path(folder) / ROUTING_FILE
        metadata = {"format": SIGNATURE_FORMAT, "layer": str(self.layer), "radius": repr(self.radius),
                    "prompts": str(self.prompts), "pooling": "mean", "quantile": str(RADIUS_QUANTILE)}
        if self.base is not None:
            metadata["base"] = self.base
        tensors = {"mean": self.mean.to(STORED_DTYPE).contiguous(),
                   "directions": self.directions.to(STORED_DTYPE).contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return path

    @classmethod
    def load(cls, folder) -> Optional["RoutingSignature"]:
        """The signature in `folder`, None when it has none; AdapterFileError when it is damaged."""
        path = Path(folder) / ROUTING_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                mean, directions = handle.get_tensor("mean").float(), handle.get_tensor("directions").float()
            radius, layer, prompts = float(metadata["radius"]), int(metadata["layer"]), int(metadata["prompts"])
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise AdapterFileError(f"{path}: not a routing signature ({type(exc).__name__}: {exc}); make it again "
                                   "with lorakit route-index") from None
        if (metadata.get("format") != SIGNATURE_FORMAT or mean.dim() != 1 or directions.dim() != 2
                or directions.shape[1] != mean.shape[0] or not (radius > 0 and math.isfinite(radius)) or layer < 0
                or not torch.isfinite(mean).all() or not torch.isfinite(directions).all()):
            raise AdapterFileError(f"{path}: a damaged or unknown routing signature; make it again with lorakit "
                                   "route-index")
        return cls(mean, directions, radius, layer, prompts, metadata.get("base"))


class SignatureStack:
    """Signatures stacked to be scored together: z of n pooled states against A signatures at once.

    numpy, not torch: a route scores one prompt, and at that size each torch call's dispatch costs more
    than its arithmetic (about 20 us against 2 us per operation on a CPU)."""

    def __init__(self, signatures: Sequence[RoutingSignature]):
        k = max(s.directions.shape[0] for s in signatures)
        self.means = np.stack([s.mean.numpy() for s in signatures])                  # (A, H)
        self.columns = np.zeros((len(signatures), self.means.shape[1], k), np.float32)  # (A, H, k): Pᵀ
        for i, s in enumerate(signatures):  # fewer directions: zero columns, which remove nothing
            self.columns[i, :, :s.directions.shape[0]] = s.directions.numpy().T
        self.radii = np.array([s.radius for s in signatures], np.float32)           # (A,)

    def distances(self, pooled: np.ndarray) -> np.ndarray:
        """(n, H) -> z (n, A)."""
        centred = pooled[:, None, :] - self.means                                   # (n, A, H)
        along = np.matmul(centred[:, :, None, :], self.columns)[:, :, 0, :]         # (n, A, k)
        squared = (centred * centred).sum(-1) - (along * along).sum(-1)
        return np.sqrt(np.maximum(squared, 0)) / self.radii

    def scores(self, pooled: np.ndarray) -> np.ndarray:
        z = self.distances(pooled)
        return np.exp(-0.5 * z * z)


# --- computing one -----------------------------------------------------------------------------------------
def signature_prompts(rows, tokenizer) -> list[list[int]]:
    """The prompt ids of training rows, as the model sees them when asked: a prompt/completion row's prompt, a
    chat row's conversation up to the last reply with the generation prompt, a text row's text. At most
    MAX_PROMPTS rows, spread evenly over the data."""
    from lorakit.data import generation_prompt, row_format

    step = max(1, math.ceil(len(rows) / MAX_PROMPTS))
    prompts = []
    for row in rows[::step]:
        if row_format(row) == "text":
            prompts.append(list(tokenizer(row.data["text"])["input_ids"]))
        else:
            prompts.append(generation_prompt(row, tokenizer)[0])
    return [p for p in prompts if p]


def compute_signature(model, prompts: Sequence[Sequence[int]], layer: int = DEFAULT_LAYER,
                      base: Optional[str] = None) -> RoutingSignature:
    """The signature of `prompts` (token ids) on `model` at `layer` (see the module docstring)."""
    if len(prompts) < 2:
        raise DataError(f"a routing signature needs at least 2 prompts; the data gives {len(prompts)}")
    check_layer(model, layer)
    pooled = pooled_states(model, prompts, layer)                      # (n, H)
    n = len(pooled)
    held = torch.arange(n) % CALIBRATE_EVERY == CALIBRATE_EVERY - 1
    if n < 2 * CALIBRATE_EVERY:  # too few to set some aside: fit and calibrate on all of them
        held = torch.ones(n, dtype=torch.bool)
    fit = pooled[~held] if (~held).any() else pooled
    mean = fit.mean(0)
    _, _, vh = torch.linalg.svd(fit - mean, full_matrices=False)
    k = min(DIRECTIONS, max(1, mean.shape[0] // 2), max(1, len(fit) - 1), vh.shape[0])
    # Rounded as stored, so the radius is the one the stored signature measures.
    mean, directions = mean.to(STORED_DTYPE).float(), vh[:k].to(STORED_DTYPE).float()
    if not torch.isfinite(mean).all():
        raise DataError(f"the base model's hidden states at layer {layer} overflow fp16; choose another --layer")
    draft = RoutingSignature(mean, directions, 1.0, layer, n, base)
    radius = float(np.quantile(draft.distance(pooled[held].numpy()), RADIUS_QUANTILE))
    radius = max(radius, 1e-6 * float(mean.norm()) + 1e-12)  # identical prompts: a radius of (almost) nothing
    return RoutingSignature(mean, directions, radius, layer, n, base)


def check_layer(model, layer: int) -> None:
    layers = model.config.num_hidden_layers
    if not 0 <= layer <= layers:
        raise DataError(f"--layer {layer}: the model has layers 0 (its token embeddings) to {layers}")


@torch.inference_mode()
def pooled_states(model, prompts: Sequence[Sequence[int]], layer: int) -> torch.Tensor:
    """The mean over each prompt's tokens of the base model's hidden state at `layer`, in fp32 (n, H)."""
    device = model.get_input_embeddings().weight.device
    pooled = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start:start + BATCH]
        lengths = torch.tensor([len(p) for p in chunk], device=device)
        ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
        for i, prompt in enumerate(chunk):
            ids[i, :len(prompt)] = torch.as_tensor(prompt)
        ids = ids.to(device)
        mask = torch.arange(ids.shape[1], device=device) < lengths[:, None]   # (n, T): right padding
        hidden = hidden_states_at(model, ids, mask, layer).float()            # (n, T, H)
        pooled.append((hidden * mask[..., None]).sum(1) / lengths[:, None])
    return torch.cat(pooled).cpu()


class _Reached(Exception):
    """Raised by the hook after layer L: the rest of the forward pass is not needed."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


@torch.inference_mode()
def prompt_state(model, prompt_ids: Sequence[int], layer: int, device: torch.device) -> np.ndarray:
    """`pooled_states` of one prompt (1, H), without padding: the per-request path."""
    ids = torch.as_tensor(prompt_ids, device=device)[None]
    return hidden_states_at(model, ids, None, layer).float().mean(1).cpu().numpy()


def hidden_states_at(model, ids: torch.Tensor, mask: Optional[torch.Tensor], layer: int) -> torch.Tensor:
    """transformers' `hidden_states[layer]` of `ids` (n, T) with padding `mask` (None: none), computing no
    layer past `layer`: (n, T, H)."""
    if layer == 0:
        return model.get_input_embeddings()(ids)
    decoder = model.get_decoder()
    attention_mask = None if mask is None else mask.long()
    if layer == model.config.num_hidden_layers:
        return decoder(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def stop(module, args, output):
        raise _Reached(output[0] if isinstance(output, tuple) else output)

    hook = decoder.layers[layer - 1].register_forward_hook(stop)
    try:
        decoder(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    except _Reached as reached:
        return reached.hidden
    finally:
        hook.remove()
    raise RuntimeError(f"the model's forward pass did not run decoder layer {layer - 1}")


# --- routing -------------------------------------------------------------------------------------------------
def read_signature(folder, model) -> Optional[RoutingSignature]:
    """The signature in `folder` if it can score prompts on `model`; None when there is none; AdapterFileError
    when it is damaged or was made on a model of another width or depth."""
    signature = RoutingSignature.load(folder)
    width, layers = model.config.hidden_size, model.config.num_hidden_layers
    if signature is not None and (signature.mean.shape[0] != width or signature.layer > layers):
        raise AdapterFileError(f"{Path(folder) / ROUTING_FILE} was made on another base model (width "
                               f"{signature.mean.shape[0]}, layer {signature.layer}; this one: width {width}, "
                               f"{layers} layers); make it again with lorakit route-index")
    return signature


@dataclass(frozen=True)
class Route:
    """Where a prompt goes: `adapter` (None: the base model); the `nearest` candidate and its `score`, whether
    or not it reached the threshold (None when no candidate has a signature); how many `candidates` had one."""

    adapter: Optional[str]
    score: Optional[float]
    candidates: int
    nearest: Optional[str] = None


class Router:
    """Scores a prompt against the signatures of candidate adapters, with the engine's base model.

    Signatures are read from an adapter's folder the first time it is a candidate and kept per content
    (digest): replacing the adapter reads its folder again. A missing signature leaves the adapter out; a
    damaged one, or one made on a model of another width, is logged once and leaves it out too. Safe from
    any thread; the model is only read."""

    def __init__(self, model, module_weights: Callable[[], ContextManager] = contextlib.nullcontext):
        """module_weights: a context in which the model's modules can run (see `DecoderRunner.module_weights`)."""
        self.model, self._module_weights = model, module_weights
        embeddings = model.get_input_embeddings()
        self.device = embeddings.weight.device
        # A plain fp32 table on the CPU is read with numpy at layer 0 (prompt_state's result, a third of its time)
        plain = type(embeddings) is torch.nn.Embedding and embeddings.weight.dtype == torch.float32
        self._table = embeddings.weight.detach().numpy() if plain and self.device.type == "cpu" else None
        self._signatures: dict[tuple[str, str], Optional[RoutingSignature]] = {}
        self._stacked: dict[tuple, list] = {}  # (name, signature) pairs -> their stacks
        self._lock = threading.Lock()
        self._forward = threading.Lock()  # the layer hook of one partial forward must not stop another's

    def signature(self, info: AdapterInfo) -> Optional[RoutingSignature]:
        key = (info.digest, info.path)
        with self._lock:
            if key in self._signatures:
                return self._signatures[key]
        signature = self._read(info)
        with self._lock:
            self._signatures[key] = signature
        return signature

    def _read(self, info: AdapterInfo) -> Optional[RoutingSignature]:
        try:
            return read_signature(info.path, self.model) if Path(info.path).is_dir() else None
        except AdapterFileError as exc:
            log.warning("adapter %r is not routable: %s", info.name, exc)
            return None

    def routable(self, infos: Sequence[AdapterInfo]) -> list[str]:
        return [info.name for info in infos if self.signature(info) is not None]

    def route(self, prompt_ids: Sequence[int], candidates: Sequence[AdapterInfo],
              threshold: float = DEFAULT_THRESHOLD) -> Route:
        """The candidate whose domain `prompt_ids` belongs to, or the base model below `threshold`."""
        signed = [(info.name, s) for info in candidates if (s := self.signature(info)) is not None]
        return self.route_signed(prompt_ids, signed, threshold)

    def route_signed(self, prompt_ids: Sequence[int], signed: Sequence[tuple[str, RoutingSignature]],
                     threshold: float = DEFAULT_THRESHOLD) -> Route:
        """`route` among (name, signature) pairs."""
        if not signed or not prompt_ids:
            return Route(None, None, len(signed))
        nearest, best = None, -1.0
        for layer, names, stack in self._stacks(tuple(signed)):
            scores = stack.scores(self._prompt_state(prompt_ids, layer))[0]
            top = int(scores.argmax())
            if scores[top] > best:
                nearest, best = names[top], float(scores[top])
        return Route(nearest if best >= threshold else None, best, len(signed), nearest)

    def _stacks(self, signed: tuple) -> list[tuple[int, list[str], SignatureStack]]:
        """The signatures stacked per layer, kept for the next request with the same candidates."""
        with self._lock:
            stacks = self._stacked.get(signed)
        if stacks is None:
            layers = sorted({s.layer for _, s in signed})
            stacks = [(layer, [name for name, s in signed if s.layer == layer],
                       SignatureStack([s for _, s in signed if s.layer == layer])) for layer in layers]
            with self._lock:
                if len(self._stacked) >= MAX_STACKS:
                    self._stacked.clear()
                self._stacked[signed] = stacks
        return stacks

    def _prompt_state(self, prompt_ids: Sequence[int], layer: int) -> np.ndarray:
        if layer == 0 and self._table is not None:
            return self._table[list(prompt_ids)].mean(0, keepdims=True)
        if layer == 0:  # no forward pass: no hook to guard
            return prompt_state(self.model, prompt_ids, 0, self.device)
        with self._forward, self._module_weights():
            return prompt_state(self.model, prompt_ids, layer, self.device)
