import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models.py

# Servers and commands the tests start keep their feedback and eval results (XDG_DATA_HOME/lorakit) in a
# folder of this run's own, not in the user's.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="lorakit-tests-data-")

# Under pytest-xdist (-n N) the workers share the machine's cores: each computes on one thread, and so do
# the commands and servers they start (OMP_NUM_THREADS), instead of every one spinning up a thread per core.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# PEFT and transformers warn about things the tests do on purpose (tiny models, Conv1D fan_in_fan_out).
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def pytest_sessionstart(session):
    """Build (or load from the cache) the compiled CPU LoRA kernel once, before any test or server needs it."""
    from lorakit.engine.lora_kernel import cpu_kernel

    cpu_kernel()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny Llama model folder with its ChatML tokenizer (what `lorakit train --model` is given in tests)."""
    from tiny_models import save_tiny_llama_folder

    return save_tiny_llama_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def skill_files(tmp_path_factory) -> dict:
    """The reverse_words skill's train and held-out files (prompt/completion and chat forms)."""
    from lorakit.data.skills import write_skill

    return write_skill("reverse_words", tmp_path_factory.mktemp("skill"), n_train=120, n_heldout=12, seed=0)
