"""`lorakit train [CONFIG.yaml] [--flags]`: every TrainConfig field is a flag; flags override the file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from lorakit.cli.generate import TRUST_PICKLE_HELP
from lorakit.train.config import FIELDS, TrainConfig

HELP = {
    "model": "hub id or local model folder (default: the embedded model)",
    "trust_pickle": TRUST_PICKLE_HELP,
    "data": "training data: .jsonl/.json/.csv/.parquet or a saved datasets folder (default: an example skill)",
    "eval_data": "held-out data (default: a held-out slice of --data, or the skill's held-out split)",
    "skill": "example skill used when --data is not given (see `lorakit skills`)",
    "chat": "train the example skill in chat-messages form",
    "output": "output folder (adapter, checkpoints, metrics, report)",
    "prompt_column": "the data's column holding the prompt (when it is not called prompt)",
    "completion_column": "the data's column holding the completion (when it is not called completion)",
    "messages_column": "the data's column holding chat messages (when it is not called messages)",
    "text_column": "the data's column holding plain text (when it is not called text)",
    "num_epochs": "passes over the training data, instead of --max-steps (may be fractional)",
    "report_to": "where to log metrics besides metrics.jsonl: tensorboard, wandb, mlflow (comma-separated) or none",
    "push_to_hub": "OWNER/NAME: upload the adapter folder to the Hugging Face hub when the run ends",
    "target_modules": "module names, a regex, or all-linear",
    "lora_plus_ratio": "LoRA+: learning-rate ratio of B to A (e.g. 16)",
    "precision": "auto = bf16 autocast where this device runs it faster, else fp32",
    "quantize": "keep the frozen base's linear layers in nf4 (QLoRA: 4-bit NormalFloat, double-quantized scales) "
                "or int8",
    "quantize_embeddings": "with --quantize: also the embedding table and output head (QLoRA keeps them 16-bit; "
                           "they dominate a small model's remaining bytes)",
    "quantize_backend": "auto (bitsandbytes where it runs, else torch), torch or bitsandbytes: the same weights",
    "compile": "torch.compile the decoder layers: faster steps after a one-off compilation (~20 s on 2 cores)",
    "on_overflow": "a sample longer than --max-length: truncate (and count) or refuse",
    "resume": "continue from the output folder's last checkpoint",
    "overwrite": "replace a run already in the output folder",
}


def _flag_type(field: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {int: int, float: float, str: str}.get(base, str)


def register(commands) -> None:
    parser = commands.add_parser("train", help="fine-tune an adapter",
                                 description="Fine-tune a LoRA adapter. Defaults: the embedded model and the "
                                             "reverse_words example skill.")
    parser.add_argument("config", nargs="?", help="YAML (or JSON) file of settings; flags override it")
    for name, field in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default_text = f" (default: {field.default})" if field.default is not None else ""
        help_text = HELP.get(name, "") + default_text
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name == "target_modules":
            parser.add_argument(flag, dest=name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=_flag_type(field), default=None, help=help_text)
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and stop")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.train.loop import train

    given = {name: getattr(args, name) for name in FIELDS}
    if given["target_modules"] is not None and len(given["target_modules"]) == 1:
        given["target_modules"] = given["target_modules"][0]
    config = TrainConfig.from_sources(args.config, given)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    train(config, given={k: v for k, v in given.items() if v is not None})
    return 0
