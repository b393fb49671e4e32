"""`lorakit estimate`: parameters, adapter size and training / inference memory from a config.json alone.

    from lorakit.estimate import Setup, estimate, read_architecture
    footprint = estimate(read_architecture("gpt3-175b"), Setup(r=4, target_modules=["q", "v"]))
    footprint.trainable                # 18874368, the LoRA paper's GPT-3 setting

architecture.py reads a config and counts parameters and LoRA targets; footprint.py is the memory model;
report.py prints it. presets/ holds config.json files of models that published figures are about.
"""

from lorakit.estimate.architecture import Architecture, architecture_from_config, preset_names, read_architecture
from lorakit.estimate.footprint import Footprint, Setup, estimate

__all__ = ["Architecture", "Footprint", "Setup", "architecture_from_config", "estimate", "preset_names",
           "read_architecture"]
