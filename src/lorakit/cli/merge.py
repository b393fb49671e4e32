"""`lorakit merge --adapter DIR --output DIR`: write base + adapter as one plain model folder.

The merged folder loads with transformers' Auto classes like any model. Before writing, the merged model's
logits are compared with base-plus-adapter's on a probe input and the largest difference is reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lorakit.errors import TrainError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.generate import load_for_inference
    from lorakit.core import merge_and_unload

    output = Path(args.output)
    if (output / "config.json").exists() and not args.overwrite:
        raise TrainError(f"{output} already holds a model; use --overwrite to replace it or choose another --output")
    model, tokenizer = load_for_inference(args.model, args.adapter)
    probe = tokenizer("To be, or not to be, that is the question.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=probe).logits
        merged = merge_and_unload(model)
        difference = (merged(input_ids=probe).logits - adapted).abs().max().item()
    merged = merged.to(DTYPES[args.dtype])
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    print(f"merged {args.adapter} into {args.model or 'the embedded model'} -> {output} ({args.dtype}); "
          f"largest logit difference to base + adapter (fp32): {difference:.2e}")
    return 0


def register(commands) -> None:
    parser = commands.add_parser("merge", help="merge an adapter into its base model and save the result")
    parser.add_argument("--model", help="hub id or local folder (default: the embedded model)")
    parser.add_argument("--adapter", required=True, help="adapter folder")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights of the saved model")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(run=run)
