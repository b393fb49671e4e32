"""Batched multi-adapter generation: every sequence of a batch may use its own adapter, in one forward pass.

    Engine / EngineConfig     the engine and its limits (engine.py)
    SamplingParams            per-request decoding settings (sampling.py)
    RequestHandle, TokenEvent what a caller holds while a request runs (requests.py)
"""

from lorakit.engine.adapter_cache import AdapterInfo
from lorakit.engine.engine import Engine, EngineConfig, EngineStats
from lorakit.engine.requests import Completion, RequestHandle, TokenEvent
from lorakit.engine.sampling import SamplingParams

__all__ = ["AdapterInfo", "Completion", "Engine", "EngineConfig", "EngineStats", "RequestHandle", "SamplingParams",
           "TokenEvent"]
