"""The collision report: does a composition keep each input's skill, and how much do their updates overlap?

Retained skill. For every input with held-out data (its run's recorded eval data, or `--eval NAME=FILE`),
exact match by greedy generation with the input alone and with the composition, on the same base and the
same examples; `retained = composed / alone`, and a skill that drops by more than DROP_WARNING points of
exact match is named in a warning.

Overlap. For two inputs adapting the same module, the principal angles θ_k between the spaces their
updates write to (the column spaces of B_x and B_y, orthonormal bases Q_x, Q_y) are given by
cos θ_k = σ_k(Q_xᵀ Q_y); the overlap is mean_k cos² θ_k, in [0, 1]: 0 when the updates write to orthogonal
directions (they cannot collide), 1 when one's directions lie inside the other's. The same is measured on
the spaces they read from (the row spaces of A), and the report gives each pair's mean over modules and
its most overlapping module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from lorakit.compose.compose import Composition, Ingredient
from lorakit.io.adapter import Adapter

DROP_WARNING = 10.0     # exact-match points a skill may lose before the report warns by name
RANK_TOLERANCE = 1e-6   # singular values below this share of the largest do not span a direction


def overlap(x: Adapter, y: Adapter) -> Optional[dict]:
    """{"modules", "write", "read", "most", "most_module"} over the modules both adapt; None if they share none."""
    shared = sorted(set(x.modules) & set(y.modules))
    if not shared:
        return None
    per_module = {}
    for module in shared:
        fx, fy = x.modules[module], y.modules[module]
        write = _mean_cos2(fx.b.reshape(fx.b.shape[0], fx.rank), fy.b.reshape(fy.b.shape[0], fy.rank))
        read = _mean_cos2(fx.a.reshape(fx.rank, -1).T, fy.a.reshape(fy.rank, -1).T)
        per_module[module] = (write, read)
    most = max(per_module, key=lambda m: max(per_module[m]))
    return {"modules": len(shared),
            "write": sum(w for w, _ in per_module.values()) / len(shared),
            "read": sum(r for _, r in per_module.values()) / len(shared),
            "most": max(per_module[most]), "most_module": most}


def _mean_cos2(u: torch.Tensor, v: torch.Tensor) -> float:
    """mean cos² of the principal angles between the column spaces of u and v."""
    qu, qv = _basis(u), _basis(v)
    if qu.shape[1] == 0 or qv.shape[1] == 0:
        return 0.0
    cosines = torch.linalg.svdvals(qu.T @ qv)
    return float((cosines ** 2).sum() / min(qu.shape[1], qv.shape[1]))


def _basis(m: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(m.double(), full_matrices=False)
    return u[:, s > RANK_TOLERANCE * s.max()] if s.numel() and s.max() > 0 else u[:, :0]


def recorded_eval_data(adapter: Adapter) -> Optional[Path]:
    """The held-out file the adapter's run recorded (train_config.json's eval_data, train_report.json's held-out
    file), if it still exists."""
    from lorakit.io.model_card import read_run_files

    folder = Path(adapter.source)
    if not folder.is_dir():
        return None
    config, report = read_run_files(folder)
    candidates = [(config or {}).get("eval_data"), ((report or {}).get("data") or {}).get("heldout")]
    for given in candidates:
        if isinstance(given, str):
            for path in (Path(given), folder / given):
                if path.is_file():
                    return path
    return None


def collision_report(made: Composition, evals: Mapping[str, Path], model_id: Optional[str] = None,
                     samples: int = 64) -> dict:
    """Each input's exact match alone and composed on `evals` (input name -> held-out file), the pairwise
    overlaps, and the warnings; the base is `model_id`, else the one the inputs record."""
    from lorakit.cli.generate import load_for_inference, recorded_base
    from lorakit.core import delete_adapter, set_adapter
    from lorakit.data import read_rows
    from lorakit.io import load_adapter
    from lorakit.train.evaluate import build_eval_set, evaluate

    inputs = list(made.inputs)
    pairs = []
    for n, x in enumerate(inputs):
        for y in inputs[n + 1:]:
            shared = overlap(x.adapter, y.adapter)
            if shared is not None:
                pairs.append({"inputs": [x.name, y.name], **shared})
    report: dict = {"overlap": pairs, "skills": [], "warnings": []}
    if not evals:
        return report
    model_id = model_id or recorded_base(inputs[0].adapter, shown=inputs[0].name)
    model, tokenizer = load_for_inference(model_id, None, command="compose")
    load_adapter(model, made.adapter, name="composed")
    by_name: dict[str, Ingredient] = {i.name: i for i in inputs}
    for name, path in evals.items():
        eval_set = build_eval_set(read_rows(path), tokenizer, max_length=512, batch_size=16, samples=samples)
        own = by_name[name].adapter
        load_adapter(model, own, name="alone")
        alone = evaluate(model, tokenizer, eval_set, precision="fp32", samples=samples)
        delete_adapter(model, "alone")
        set_adapter(model, "composed")
        composed = evaluate(model, tokenizer, eval_set, precision="fp32", samples=samples)
        before, after = alone.get("exact_match"), composed.get("exact_match")
        skill = {"input": name, "data": str(path), "samples": composed.get("exact_match_samples", 0),
                 "alone": before, "composed": after}
        if before is not None and after is not None:
            skill["retained"] = after / before if before else None
            drop = 100 * (before - after)
            skill["drop_points"] = round(drop, 1)
            if drop > DROP_WARNING:
                report["warnings"].append(f"{name}: exact match drops {drop:.1f} points ({100 * before:.1f}% alone, "
                                          f"{100 * after:.1f}% composed) on {path}")
        report["skills"].append(skill)
    return report
