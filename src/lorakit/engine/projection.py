"""`y = x W^T + b`, computed the fastest way this machine offers, chosen once at start-up.

Decoding multiplies a few rows (one token per sequence) by every weight of the model, a shape for which
the default CPU kernel is poor. Three forms compute the same product:

    "linear"   F.linear(x, W, b): the reference, and what runs on GPUs
    "left"     (W x^T)^T: the same BLAS call with the operands swapped, up to 1.5x faster for 16 rows
    "packed"   oneDNN with W reordered once into its blocked layout (`torch.ops.mkldnn`, what PyTorch's
               own compiler uses for frozen CPU inference): about 3x faster for 16 rows in fp32 on a
               2-core AVX-512 machine

`choose_form` times each on the model's first-layer weights, for batches of 1, 4 and 16 rows, and picks the
fastest overall, preferring "packed" on near-ties. All forms agree to
float rounding (tested), and the packed form gives every row the same result whatever the batch size,
so a request's greedy tokens do not depend on what it is batched with.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

FORMS = ("linear", "left", "packed")


def packed_available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                                      "_linear_pointwise")


class Projection:
    """One weight (out, in) and bias, ready to multiply in `form`."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], form: str, rows_hint: int = 16):
        self._plain, self.bias, self.form = weight, bias, form
        self.out_features = weight.shape[0]
        self.packed = (torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
                       if form == "packed" else None)

    @property
    def weight(self) -> torch.Tensor:
        """W (out, in): the plain tensor, or unpacked from the packed one (exactly) once that is all there is."""
        return self._plain if self._plain is not None else self.packed.to_dense()

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
        if self.form == "linear":
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
    descheduled round does not decide either. "packed" wins unless another form costs less by more than
    PACKED_PREFERENCE: it also lets an engine hold its weights once (the packed copy alone) and gives every
    row the same result whatever its batch, which is worth a few percent of speed, and a choice made on
    near-ties would flip from one start to the next."""
    device = weights[0].device
    if device.type != "cpu":
        return "linear"
    forms = [f for f in FORMS if f != "packed" or packed_available(device)]
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
    if "packed" in cost and cost[cheapest] >= (1 - PACKED_PREFERENCE) * cost["packed"]:
        return "packed"
    return cheapest
