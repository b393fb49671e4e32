"""`y = x W^T + b`, computed the fastest way this machine offers, chosen once at start-up.

Decoding multiplies a few rows (one token per sequence) by every weight of the model, a shape for which
the default CPU kernel is poor. Four forms compute the same product:

    "linear"   F.linear(x, W, b): the reference, and what runs on GPUs
    "left"     (W x^T)^T: the same BLAS call with the operands swapped, up to 1.5x faster for 16 rows
    "packed"   oneDNN with W reordered once into its blocked layout (`torch.ops.mkldnn`, what PyTorch's
               own compiler uses for frozen CPU inference): about 3x faster for 16 rows in fp32 on a
               2-core AVX-512 machine
    "panels"   lorakit's compiled kernel (`linear_panels_cpu.cpp`, fp32) with W held in panels of 64
               outputs, (P, in, 64): each weight read once, in order, for any number of rows. On the
               embedded model at one thread (`benchmarks/projection_forms.py`), 2, 4 and 16 rows take
               0.7-1.0x, 0.6-0.75x and 0.8x of a BLAS call's time; one row is faster only while the
               weights stay in the cache (a 67 MB weight from memory: 1.35x)

`choose_form` times each on the model's first-layer weights, for batches of 1, 4 and 16 rows, and picks the
fastest overall, preferring the forms that hold W once in their own layout ("packed", "panels") on
near-ties. All forms agree to float rounding (tested), and those two give every row the same result
whatever the batch size, so a request's greedy tokens do not depend on what it is batched with.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

FORMS = ("linear", "left", "packed", "panels")
OWN_LAYOUT = ("packed", "panels")  # forms that can hold W in their layout alone
PANEL = 64                         # outputs per panel (linear_panels_cpu.cpp)


def packed_available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                                      "_linear_pointwise")


def panels_kernel(weight: torch.Tensor):
    """The compiled module whose `linear_panels` multiplies by `weight` (fp32 on a CPU), or None."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    from lorakit.engine.lora_kernel import cpu_kernel

    return cpu_kernel()


def form_available(form: str, weight: torch.Tensor) -> bool:
    """Whether `form` can multiply by `weight` here ("linear" and "left" always can)."""
    if form == "packed":
        return packed_available(weight.device)
    if form == "panels":
        return panels_kernel(weight) is not None
    return form in FORMS


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """W (out, in) -> panels (ceil(out / 64), in, 64): panels[p, k, c] = W[64p + c, k], zero past `out`."""
    out, width = weight.shape
    count = -(-out // PANEL)
    padded = weight.new_zeros(count * PANEL, width)
    padded[:out] = weight
    return padded.view(count, PANEL, width).transpose(1, 2).contiguous()


def unpack_panels(panels: torch.Tensor, out: int) -> torch.Tensor:
    """The inverse of `pack_panels`: W (out, in), exactly."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out].contiguous()


def _packed_copy(weight: torch.Tensor, form: str, rows_hint: int) -> Optional[torch.Tensor]:
    if form == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    if form == "panels":
        return pack_panels(weight.detach())
    return None


class Projection:
    """One weight (out, in) and bias, ready to multiply in `form`."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], form: str, rows_hint: int = 16):
        self._plain, self.bias, self.form = weight, bias, form
        self.out_features = weight.shape[0]
        self.packed = _packed_copy(weight, form, rows_hint)  # the form's own layout of W (None: plain W)
        if form == "panels":
            self._kernel = panels_kernel(weight)
            if self._kernel is None:
                raise ValueError("the panels form needs fp32 weights on a CPU and lorakit's compiled kernel")

    @property
    def weight(self) -> torch.Tensor:
        """W (out, in): the plain tensor, or unpacked from the packed one (exactly) once that is all there is."""
        if self._plain is not None:
            return self._plain
        return self.packed.to_dense() if self.form == "packed" else unpack_panels(self.packed, self.out_features)

    def drop_plain(self) -> None:
        """Keep only the packed copy (the weights held once); `weight` unpacks it when asked."""
        if self.packed is not None:
            self._plain = None

    def plus(self, delta: torch.Tensor) -> "Projection":
        """`W + delta` in the same form; this projection's tensors are never written. `delta` is the caller's
        to give away: in W's dtype, the sum is written into it (no second copy of the weight in memory). A
        packed result keeps only its packed copy (the plain sum is what it was packed from)."""
        weight = self.weight
        merged = Projection(delta.to(weight.dtype).add_(weight), self.bias, self.form)
        merged.drop_plain()
        return merged

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self.form == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.form == "panels" and x.dtype == torch.float32:
            return self._kernel.linear_panels(x.contiguous(), self.packed, self.out_features, self.bias)
        if self.form in ("linear", "panels"):  # panels: an input in another dtype takes the reference
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        y = (self.weight @ rows.t()).t().reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


PACKED_PREFERENCE = 0.10
TIMED_ROWS = (1, 4, 16)  # decode batches: one user, a few, a full batch


def choose_form(weights: list[torch.Tensor], rows: tuple[int, ...] = TIMED_ROWS, repeats: int = 7) -> str:
    """The form for these weights on their device ("linear" off the CPU), timed with the thread count the
    caller runs with (set it first).

    Each form multiplies batches of each size in `rows`, in alternating rounds, compared by the median of
    each size; a form's cost is the sum over the sizes of its median over the best form's, so that no one
    batch size decides alone (small batches favour a plain BLAS call, large ones the packed layout). One
    descheduled round does not decide either. The cheaper of "packed" and "panels" wins unless another form
    costs less by more than PACKED_PREFERENCE: they let an engine hold its weights once (in their layout
    alone) and give every row the same result whatever its batch, which is worth a few percent of speed,
    and a choice made on near-ties would flip from one start to the next."""
    device = weights[0].device
    if device.type != "cpu":
        return "linear"
    forms = [f for f in FORMS if all(form_available(f, w) for w in weights)]
    cost = dict.fromkeys(forms, 0.0)
    for count in rows:
        inputs = {w.shape[1]: torch.randn(count, w.shape[1], dtype=w.dtype) for w in weights}
        projections = {form: [Projection(w, None, form, count) for w in weights] for form in forms}
        times: dict[str, list[float]] = {form: [] for form in forms}
        for round_ in range(repeats + 1):
            for form in forms if round_ % 2 else reversed(forms):
                start = time.perf_counter()
                for projection, weight in zip(projections[form], weights):
                    projection(inputs[weight.shape[1]])
                if round_:                                   # the first round warms up
                    times[form].append(time.perf_counter() - start)
        median = {form: sorted(t)[len(t) // 2] for form, t in times.items()}
        best = min(median.values())
        for form in forms:
            cost[form] += median[form] / best
    cheapest = min(cost, key=cost.get)
    own = [form for form in OWN_LAYOUT if form in cost]
    if own:
        best_own = min(own, key=cost.get)
        if cost[cheapest] >= (1 - PACKED_PREFERENCE) * cost[best_own]:
            return best_own
    return cheapest
