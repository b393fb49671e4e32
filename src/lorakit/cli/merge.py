"""`lorakit merge --adapter DIR --output DIR`: write base + adapter as one plain model folder.

The merged folder loads with transformers' Auto classes like any model. Before writing, the merged model's
logits are compared with base-plus-adapter's on a probe input and the largest difference is reported.
An adapter trained on a quantized base (`--quantize nf4|int8`) is merged into that base dequantized, the
weights it was trained against; `--requantize` reports what quantizing the merged model again costs.

The model is first compared with the base the adapter recorded when it was saved (io.base_record): a
model that already holds this adapter merged is refused, since merging again would apply it twice
(`--force` merges anyway), and a model that is another base gets a one-line warning naming the recorded one.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from lorakit.cli.generate import add_model_flags, add_quantize_flags
from lorakit.errors import TrainError

from lorakit.models import PRECISIONS as DTYPES


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.generate import load_for_inference
    from lorakit.core import merge_and_unload
    from lorakit.io.safetensors_file import give_plain_modes
    from lorakit.quant import dequantize_model, quantize_model

    output = Path(args.output)
    if (output / "config.json").exists() and not args.overwrite:
        raise TrainError(f"{output} already holds a model; use --overwrite to replace it or choose another --output")
    model, tokenizer = load_for_inference(args.model, args.adapter, args.quantize, args.quantize_backend,
                                          args.quantize_embeddings, args.trust_pickle, command="merge",
                                          force=args.force)
    probe = tokenizer("To be, or not to be, that is the question.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=probe).logits
        if args.quantize:  # merge into the dequantized base: exactly the weights the adapter was trained on
            dequantize_model(model, torch.float32)
        merged = merge_and_unload(model)
        difference = (merged(input_ids=probe).logits - adapted).abs().max().item()
        if args.requantize:
            requantized = copy.deepcopy(merged)
            quantize_model(requantized, args.requantize, args.quantize_backend, embeddings=args.quantize_embeddings)
            requantized_difference = (requantized(input_ids=probe).logits - adapted).abs().max().item()
    merged = merged.to(DTYPES[args.dtype])
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    give_plain_modes(output)
    base = (args.model or "the embedded model") + (f" ({args.quantize}, dequantized)" if args.quantize else "")
    print(f"merged {args.adapter} into {base} -> {output} ({args.dtype}); largest logit difference to base + "
          f"adapter (fp32): {difference:.2e}")
    if args.requantize:
        print(f"requantized to {args.requantize} (what `--quantize {args.requantize}` does when serving it): largest "
              f"logit difference to base + adapter: {requantized_difference:.2e}")
    return 0


def register(commands) -> None:
    parser = commands.add_parser("merge", help="merge an adapter into its base model and save the result")
    add_model_flags(parser)
    parser.add_argument("--adapter", required=True, help="adapter folder")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights of the saved model")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --output")
    parser.add_argument("--force", action="store_true",
                        help="merge even into a model that already contains this adapter merged (applies it twice)")
    add_quantize_flags(parser)
    parser.add_argument("--requantize", choices=["nf4", "int8"],
                        help="also quantize the merged model and report how far its outputs move (the folder is "
                             "saved unquantized; serve it with --quantize to run it quantized)")
    parser.set_defaults(run=run)
