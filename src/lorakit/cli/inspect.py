"""`lorakit inspect DIR [--json]`: check an adapter folder and say what it holds."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from lorakit.io.inspect import describe_adapter

    info = describe_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    targets = info["target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    variant = "DoRA" if info["use_dora"] else "LoRA"
    print(f"{info['folder']}: a {variant} adapter for {info['base_model'] or 'an unnamed base model'}")
    print(f"  rank {info['r']} (in file: {info['ranks_in_file']}), alpha {info['lora_alpha']}, "
          f"scale {info['scaling']:.4g}{' (rsLoRA)' if info['use_rslora'] else ''}")
    print(f"  targets: {targets} -> {info['adapted_modules']} modules")
    if info["recorded_base"]:
        base = info["recorded_base"]
        print(f"  recorded base: {base['name'] or 'a model built in memory'} ({base['source']}), weights "
              f"{base['digest'] or 'not fingerprinted'}")
    if info["modules_to_save"]:
        print(f"  trained in full: {', '.join(info['modules_to_save'])}")
    print(f"  {info['parameters']:,} parameters, {info['file_bytes']:,} bytes, {'/'.join(info['dtypes'])}")
    if info["vllm_compatible"]:
        print(f"  vLLM: loads as is (with --max-lora-rank {info['vllm_max_lora_rank']} or more)")
    else:
        print("  vLLM: would refuse it: " + "; ".join(info["vllm_problems"]))
    return 0


def register(commands) -> None:
    parser = commands.add_parser("inspect", help="check an adapter folder and say what it holds")
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(run=run)
