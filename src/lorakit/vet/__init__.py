"""`lorakit vet`: is an adapter safe to load and to serve? Three stages, cheapest first.

    report = vet_adapter("runs/reverse")        # files, weights, behaviour against the base
    report.verdict                              # "pass" or "flagged" (the registry reads it from vet_report.json)

files (vet.files): what `Adapter.read` checks, no pickle anywhere in the folder, sane scales and factors.
weights (vet.weights): per-module spectral statistics of ΔW = s·BA, computed from the r x r core.
behaviour (vet.behaviour): KL drift from the base on probe prompts, and a gradient-guided trigger search;
    with the training data at hand, the rows that planted a trigger (vet.training_data), tried on the model.
"""

from lorakit.vet.report import VetReport, vet_adapter

__all__ = ["VetReport", "vet_adapter"]
