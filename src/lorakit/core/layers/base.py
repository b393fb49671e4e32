"""`LoraLayer`: a frozen base layer with named low-rank updates beside it.

    h = base(x) + s · B A dropout(x)

Each adapter `name` owns A (`lora_A[name]`), B (`lora_B[name]`), a scale s and a variant (vanilla LoRA
or DoRA, see `core.variants`). At most one adapter runs in the forward pass: the active one, unless it
is merged into the base weight or adapters are disabled.

Subclasses (Linear/Conv1D, Embedding, ConvNd) describe their geometry with a few hooks; everything that
is the same for every layer kind (bookkeeping, merge, the variant seam) lives here once. The hooks work
on the "rows" view of the base weight: a (d_out, d_in_flat) matrix whose row i produces output feature /
channel i. In that view every kind's update is the same matrix product `ΔW_rows = s · B_rows @ A_rows`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from lorakit.errors import AdapterError


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters of a half-precision base are kept in fp32 (stable optimiser updates); else the base's."""
    if weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


class LoraLayer(nn.Module):
    """Base class of the wrappers that `add_adapter` puts in place of targeted modules."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA only
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.variants: dict[str, Any] = {}
        self.merged_adapters: list[str] = []
        self.dora_merge_norms: dict[str, torch.Tensor] = {}
        self.pissa_initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (A0, B0), see core.pissa
        self.active_adapter: Optional[str] = None
        self.adapters_disabled = False
        # What forward() adds: the active adapter unless merged or disabled. Kept up to date by
        # _refresh() so the hot path reads one attribute.
        self._runs: Optional[str] = None

    # --- hooks for subclasses --------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for rank r, as stored and saved (PEFT's layout)."""
        raise NotImplementedError

    def to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A base-layout weight (or delta) as the (d_out, d_in_flat) rows view."""
        raise NotImplementedError

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of to_rows: back to the base weight's layout."""
        raise NotImplementedError

    def factor_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_rows (d_out, r), A_rows (r, d_in_flat)) of adapter `name`."""
        raise NotImplementedError

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · B A dropout(x), shaped like the base output."""
        raise NotImplementedError

    def add_lora(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """result + s · B A dropout(x); subclasses override with a fused version."""
        lora = self.lora_output(x, name)
        return result + lora.to(result.dtype)

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias (DoRA rescales the weight term only)."""
        raise NotImplementedError

    @property
    def base_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def per_output(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A (d_out,) vector shaped to broadcast over the output features of `like`."""
        return vector

    def supports_init(self, init: Any) -> bool:
        """PiSSA needs an SVD of a plain matrix weight; only linear layers offer one."""
        return not (isinstance(init, str) and init.startswith("pissa"))

    def reset_factors(self, name: str, init: Any) -> None:
        """init True: Kaiming-uniform A, zero B; "gaussian": A ~ N(0, 1/r), zero B; False: both random."""
        a, b = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / a.shape[0])
            else:
                kaiming_uniform_(a)
            if init is False:
                kaiming_uniform_(b)
            else:
                nn.init.zeros_(b)

    # --- adapters ------------------------------------------------------------------------------------
    def add(self, name: str, r: int, scaling: float, dropout: float, variant: Any) -> None:
        """Create adapter `name`'s parameters (uninitialised: call `variant.init` or copy weights in)."""
        shape_a, shape_b = self.factor_shapes(r)
        weight = self.weight
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, **kwargs))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, **kwargs))
        self.scaling[name] = scaling
        self.dropout_p[name] = dropout
        self.variants[name] = variant
        variant.create(self, name)

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged; unmerge it before deleting it")
        for params in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in params:
                del params[name]
        for table in (self.scaling, self.dropout_p, self.variants, self.pissa_initial):
            table.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None
        self._refresh()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    def set_active(self, name: Optional[str]) -> None:
        self.active_adapter = name if name in self.lora_A else None
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.adapters_disabled = disabled
        self._refresh()

    def _refresh(self) -> None:
        name = self.active_adapter
        runs = not self.adapters_disabled and name is not None and name not in self.merged_adapters
        self._runs = name if runs else None

    # --- the math ------------------------------------------------------------------------------------
    def dropout(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.dropout_p[name]
        return torch.nn.functional.dropout(x, p, training=True) if p > 0 and self.training else x

    def delta_rows(self, name: str) -> torch.Tensor:
        """ΔW_rows = s · B_rows A_rows in fp32, (d_out, d_in_flat)."""
        b_rows, a_rows = self.factor_rows(name)
        return self.scaling[name] * (b_rows.float() @ a_rows.float())

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the base weight's layout and fp32."""
        return self.from_rows(self.delta_rows(name))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self._runs
        if name is None:
            return result
        return self.variants[name].forward(self, name, x, result)

    def merged_weight(self, name: str) -> torch.Tensor:
        """The weight with adapter `name` merged in (fp32, not yet written); refuses NaN/Inf."""
        merged = self.variants[name].merge(self, name, self.weight.detach().float())
        if not torch.isfinite(merged).all():
            raise AdapterError(f"merging adapter {name!r} would put NaN/Inf into the base weight; nothing merged")
        return merged

    def write_merged(self, name: str, merged: torch.Tensor) -> None:
        """W ← merged, cast back to W's dtype; the forward pass stops adding adapter `name`."""
        if getattr(self.base_layer, "is_quantized_linear", False):
            raise AdapterError(f"cannot merge adapter {name!r} into a quantized (4/8-bit) base layer: the merged "
                               "weight would not be representable. Dequantize the model first "
                               "(lorakit.quant.dequantize_model), as `lorakit merge` does")
        with torch.no_grad():
            self.weight.copy_(merged.to(self.weight.dtype))
        self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self) -> None:
        """Undo merges, newest first, restoring W (fp32 relative error ~1e-7)."""
        weight = self.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            restored = self.variants[name].unmerge(self, name, weight.detach().float())
            with torch.no_grad():
                weight.copy_(restored.to(weight.dtype))
        self._refresh()

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={self.rank(name)}" for name in self.adapter_names)
        return f"adapters={{{ranks}}}, active={self.active_adapter!r}, merged={self.merged_adapters}"


def kaiming_uniform_(tensor: torch.Tensor) -> None:
    """nn.Linear's default init (Kaiming uniform, a=sqrt(5)), which PEFT uses for A."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
