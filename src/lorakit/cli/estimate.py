"""`lorakit estimate --model M|config.json --method full|lora|qlora ...`: will it fit?

Trainable parameters, the adapter's file size and memory (weights, gradients, optimizer state,
activations; training and inference) from the model's config.json alone; with --device-memory a one-line
verdict, with --json the same figures for scripts. The memory model is in lorakit/estimate/footprint.py.
"""

from __future__ import annotations

import argparse
import json

from lorakit.estimate.footprint import ATTENTIONS, DTYPE_BYTES, METHODS, OPTIMIZERS, Setup

DEFAULTS = Setup()


def register(commands) -> None:
    from lorakit.estimate.architecture import preset_names

    parser = commands.add_parser(
        "estimate", help="parameters, adapter size and memory of fine-tuning a model, from its config",
        description="Count trainable parameters and estimate the adapter's size and the memory of training and "
                    "inference from a model's config.json alone (no weights are read).")
    parser.add_argument("--model", default=None,
                        help="hub id (only config.json is fetched), model folder, config.json file, or a preset: "
                             f"{', '.join(preset_names())} (default: the embedded model)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULTS.method,
                        help="full fine-tune, LoRA, or QLoRA (NF4 base) (default: %(default)s)")
    parser.add_argument("--r", type=int, default=DEFAULTS.r, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--target-modules", nargs="+", default=[DEFAULTS.target_modules],
                        help="linear layers to adapt: all-linear, or names (q_proj v_proj; q v; for gpt2-style "
                             "models q, k, v are the thirds of c_attn) (default: all-linear)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="sequences per step (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=DEFAULTS.max_length,
                        help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="keep only each layer's input and recompute the rest in the backward pass")
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=DEFAULTS.dtype,
                        help="weights and compute (default: %(default)s)")
    parser.add_argument("--adapter-dtype", choices=tuple(DTYPE_BYTES), default=DEFAULTS.adapter_dtype,
                        help="LoRA adapters and their gradients: fp32 as lorakit train keeps them, bf16 as the "
                             "QLoRA paper's code does (default: %(default)s)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer,
                        help="adamw: two fp32 moments per trainable parameter; sgd: none (default: %(default)s)")
    parser.add_argument("--attention", choices=ATTENTIONS, default=DEFAULTS.attention,
                        help="sdpa (fused: no attention matrix kept) or eager (keeps batch x heads x length² "
                             "probabilities) (default: %(default)s)")
    parser.add_argument("--device-memory", default=None,
                        help="say whether training fits in this much memory, e.g. 24GB, 80GiB (a bare number is GB)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (counts, sizes in bytes)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.estimate import estimate, read_architecture
    from lorakit.estimate.report import as_dict, as_text, parse_size

    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    setup = Setup(method=args.method, r=args.r, target_modules=targets, batch_size=args.batch_size,
                  max_length=args.max_length, gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
                  adapter_dtype=args.adapter_dtype, optimizer=args.optimizer, attention=args.attention)
    device = parse_size(args.device_memory) if args.device_memory is not None else None
    arch = read_architecture(args.model)
    footprint = estimate(arch, setup)
    if args.json:
        print(json.dumps(as_dict(arch, setup, footprint, device), indent=2))
    else:
        print(as_text(arch, setup, footprint, device))
    return 0
