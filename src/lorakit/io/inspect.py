"""`describe_adapter(folder)`: what an adapter folder holds, checked, without loading any model.

Reads the config and weights with the same strict readers as `load_adapter`, groups the tensors by
module, and says whether vLLM would serve the adapter as it is (one r and alpha, plain LoRA keys only,
r no larger than vLLM's largest `--max-lora-rank`) and with which `--max-lora-rank`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Union

from lorakit.io.adapter import Adapter, split_key

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # the values vLLM's --max-lora-rank takes


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that serves rank `r` (vLLM needs r <= it); None past 512."""
    return next((rank for rank in VLLM_RANKS if rank >= r), None)


def vllm_problems(config, parts: Counter, other_keys: list[str]) -> list[str]:
    """Why vLLM would refuse this adapter (empty when it would load it)."""
    problems = []
    if config.use_dora or parts.get("magnitude"):
        problems.append("DoRA (lora_magnitude_vector) is not supported by vLLM")
    if config.modules_to_save or other_keys:
        problems.append("full-weight keys (modules_to_save) are rejected by vLLM")
    if config.rank_pattern or config.alpha_pattern:
        problems.append("rank_pattern/alpha_pattern: older vLLM applies one global r and alpha")
    if vllm_max_lora_rank(config.r) is None:
        problems.append(f"r={config.r} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    if isinstance(config.target_modules, str):
        problems.append("target_modules is a regex; vLLM expects a list of module names")
    return problems


def describe_adapter(path: Union[str, Path]) -> dict[str, Any]:
    adapter = Adapter.read(path)
    config, tensors = adapter.config, adapter.tensors
    parts = Counter(split_key(key)[1] for key in tensors if split_key(key)[1] is not None)
    other = list(adapter.saved_modules)
    ranks = sorted({factors.rank for factors in adapter.modules.values()})
    return {
        "folder": adapter.source,
        "digest": adapter.digest,
        "base_model": config.base_model_name_or_path,
        "task_type": config.task_type,
        "r": config.r,
        "ranks_in_file": ranks,
        "lora_alpha": config.lora_alpha,
        "scaling": config.scaling_for(""),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save,
        "adapted_modules": len(adapter.modules),
        "parameters": sum(t.numel() for t in tensors.values()),
        "file_bytes": adapter.file_bytes,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "vllm_compatible": not vllm_problems(config, parts, other),
        "vllm_problems": vllm_problems(config, parts, other),
        "vllm_max_lora_rank": vllm_max_lora_rank(max(ranks, default=config.r)),
        "recorded_base": ({"name": adapter.base.name, "source": adapter.base.source, "digest": adapter.base.digest}
                          if adapter.base is not None else None),
    }
