import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models.py

# PEFT and transformers warn about things the tests do on purpose (tiny models, Conv1D fan_in_fan_out).
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def pytest_sessionstart(session):
    """Build (or load from the cache) the compiled CPU LoRA kernel once, before any test or server needs it."""
    from lorakit.engine.lora_kernel import cpu_kernel

    cpu_kernel()
