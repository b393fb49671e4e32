"""`lorakit vet DIR [--model BASE] [--probe-data FILE] [--training-data FILE | --no-training-data] [--json] [--save]`:
is an adapter safe to serve?

Exit status: 0 when the adapter passes, 1 when a stage flags it, 2 for a user's error (no such folder, a
bad --probe-data, --training-data or --model). The method, its cost and its limits: docs/vetting.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from lorakit.vet import vet_adapter

    report = vet_adapter(Path(args.adapter), model=args.model, probe_data=args.probe_data,
                         trust_pickle=args.trust_pickle, training_data=args.training_data,
                         scan_training_data=not args.no_training_data)
    document = report.as_json()
    if args.save:
        from lorakit.io.safetensors_file import atomic_write_bytes
        from lorakit.registry.registry import VET_REPORT

        atomic_write_bytes(Path(args.adapter) / VET_REPORT, (json.dumps(document, indent=2) + "\n").encode())
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(render(document))
    return 0 if report.verdict == "pass" else 1


def render(document: dict) -> str:
    """The report for a person: one line per stage, its findings and warnings, the trigger example."""
    lines = [f"{document['folder']}: {document['verdict'].upper()}"
             + (f" (base: {document['base']})" if document.get("base") else "")]
    for stage in document["stages"]:
        seconds = f", {stage['seconds']:.1f}s" if "seconds" in stage else ""
        lines.append(f"  {stage['stage']}: {stage['verdict']}{seconds}")
        if stage["stage"] == "weights" and stage["verdict"] != "skipped":
            relative = stage["max_relative_change"]
            lines.append(f"    max ||ΔW||₂ {stage['max_spectral_norm']:.3g}, min effective rank "
                         f"{stage['min_effective_rank']:.2f}"
                         + (f", max ||ΔW||_F/||W||_F {relative:.3g}" if relative is not None else ""))
        if stage["stage"] == "behaviour" and stage["verdict"] != "skipped":
            top = stage["trigger_search"]["candidates"][0]
            lines.append(f"    drift KL(adapter || base) on {stage['probe_prompts']} prompts "
                         f"({stage['probe_source']}): mean {stage['drift_kl_mean']:.3g}, max {stage['drift_kl_max']:.3g}")
            search = stage["trigger_search"]
            data = stage.get("training_data") or {}
            lines.append(f"    training data: {data['source']}, {data['rows']} rows, {len(data['suspects'])} suspect "
                         f"phrase(s)" if data.get("scanned") else f"    training data: {data.get('note', 'not scanned')}")
            label = "trigger from the training data" if top.get("from") == "training data" else "strongest insertion found"
            lines.append(f"    {label}: {top['text']!r}, score {top['score']:.2f}, same-token rate "
                         f"{top['same_token_rate']:.0%} (random token: {search['null_score_median']:.2f}, "
                         f"{search['null_same_token_rate_median']:.0%})")
        lines += [f"    FLAG: {finding}" for finding in stage["findings"]]
        lines += [f"    warning: {warning}" for warning in stage.get("warnings", [])]
        if "example" in stage:
            example = stage["example"]
            lines += [f"    prompt:              {example['prompt']!r}",
                      f"    output without:      {example['output_without']!r}",
                      f"    with the trigger:    {example['prompt_with_trigger']!r}",
                      f"    output with:         {example['output_with']!r}"]
    return "\n".join(lines)


def register(commands) -> None:
    from lorakit.cli.generate import add_model_flags

    parser = commands.add_parser("vet", help="check an adapter for unsafe files, odd weights and backdoor triggers")
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    add_model_flags(parser)
    parser.add_argument("--probe-data", help="prompts to probe the behaviour with (.jsonl/.json/.csv/.parquet; only "
                                             "prompts are read; default: the run's recorded eval data, else a "
                                             "built-in generic set)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--training-data", metavar="FILE",
                      help="the rows the adapter was trained on, scanned for poisoned rows (a phrase whose rows all "
                           "complete alike) and each suspect tried on the model; default: the data its "
                           "train_config.json records, when that file is still there and matches the card")
    data.add_argument("--no-training-data", action="store_true",
                      help="do not scan training data, even where the run records it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (stages and verdict)")
    parser.add_argument("--save", action="store_true",
                        help="also write the report to DIR/vet_report.json (what `lorakit registry add` stores)")
    parser.set_defaults(run=run)
