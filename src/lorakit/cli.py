"""The `lorakit` command.

    lorakit inspect DIR [--json]     check an adapter folder and say what it holds

A user's mistake (a bad path, a corrupt file) prints one clear line and exits with status 2; it never
ends in a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from lorakit.errors import LorakitError


def _inspect(args: argparse.Namespace) -> int:
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
    if info["modules_to_save"]:
        print(f"  trained in full: {', '.join(info['modules_to_save'])}")
    print(f"  {info['parameters']:,} parameters, {info['file_bytes']:,} bytes, {'/'.join(info['dtypes'])}")
    if info["vllm_compatible"]:
        print("  vLLM: loads as is")
    else:
        print("  vLLM: would refuse it: " + "; ".join(info["vllm_problems"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Train, check, store and serve LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="check an adapter folder and say what it holds")
    inspect.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print the figures as JSON")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LorakitError as exc:
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
