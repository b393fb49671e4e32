"""The bitsandbytes backend: its kernels quantize and dequantize, into the same containers as the torch path.

bitsandbytes (>= 0.45) runs on CPUs as well as CUDA. What it computes here, and what stays in lorakit:

    NF4:  4-bit indices and block maxima by `quantize_4bit`; the block maxima's double quantization by
          lorakit (`nf4.with_double_quantized_scales`); dequantization by `dequantize_4bit`.
    int8: row-wise quantization by `int8_vectorwise_quant`; dequantization by `int8_vectorwise_dequant`.

Each weight is dequantized once by both bitsandbytes and the torch path when it is quantized; if they
differ (bitsandbytes 0.50's AVX-512 CPU kernel mis-dequantizes bf16 rows whose length is a multiple of
32 but not of 64), that weight dequantizes through the torch path, so the backends agree by construction
and are tested to.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Optional

import torch

from lorakit.quant.codes import nf4_code
from lorakit.quant.int8 import Int8Weight
from lorakit.quant.nf4 import BLOCK, NF4Weight, with_double_quantized_scales


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_type: str) -> Optional[str]:
    """None if bitsandbytes can quantize on this device type, else why not."""
    # bitsandbytes logs that an optional kernel package (for its CPU 4-bit matmul, unused here) is missing
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as bnb_functional
        probe = torch.randn(4, BLOCK, device=device_type)
        packed, state = bnb_functional.quantize_4bit(probe, blocksize=BLOCK, quant_type="nf4")
        bnb_functional.dequantize_4bit(packed, state)
    except Exception as exc:  # not installed, no kernel for this device, a broken build
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(weight.detach().contiguous(), blocksize=BLOCK,
                                                 compress_statistics=False, quant_type="nf4")
    return with_double_quantized_scales(packed.view(-1), state.absmax.float(), weight)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.functional import QuantState

    state = QuantState(absmax=q.block_absmax(), shape=q.shape, dtype=dtype, blocksize=BLOCK,
                       code=nf4_code(str(q.packed.device)), quant_type="nf4")
    return bnb_functional.dequantize_4bit(q.packed.view(-1, 1), state)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    import bitsandbytes.functional as bnb_functional

    values, row_absmax, _ = bnb_functional.int8_vectorwise_quant(weight.detach().contiguous())
    return Int8Weight(values, row_absmax.float(), weight.dtype)


def dequantize_int8(q: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.int8_vectorwise_dequant(q.values, q.row_absmax).to(dtype)
