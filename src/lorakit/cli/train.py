"""`lorakit train [CONFIG.yaml] [--flags]`: every TrainConfig field is a flag; flags override the file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from lorakit.cli.generate import TRUST_PICKLE_HELP
from lorakit.data.skills import SKILLS
from lorakit.train.settings_file import ALIASES
from lorakit.train.config import (FIELDS, OVERFLOW, PRECISIONS, QUANTIZE, QUANTIZE_BACKENDS, REPORT_TO, SCHEDULES,
                                  STRATEGIES, TrainConfig)

HELP = {
    # what to train on
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
    # the adapter
    "r": "LoRA rank: the inner size of B A",
    "lora_alpha": "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --use-rslora)",
    "lora_dropout": "dropout on the adapter's input, in [0, 1)",
    "target_modules": "module names, a regex, or all-linear",
    "use_rslora": "rsLoRA: scale by alpha / sqrt(r), which keeps high ranks learning",
    "use_dora": "DoRA: learn each weight column's magnitude apart from its direction",
    "alora_invocation": "activated LoRA (aLoRA): the text whose tokens start the update in each row; everything "
                        "before it runs as the base (packing is off for aLoRA runs)",
    "alora_insert": "with --alora-invocation: append the invocation to the prompts that lack it (default: refuse "
                    "such rows, which train nothing)",
    "quantize": "keep the frozen base's linear layers in nf4 (QLoRA: 4-bit NormalFloat, double-quantized scales) "
                "or int8",
    "quantize_backend": "auto (bitsandbytes where it runs, else torch), torch or bitsandbytes: the same weights",
    "quantize_embeddings": "with --quantize: also the embedding table and output head (QLoRA keeps them 16-bit; "
                           "they dominate a small model's remaining bytes)",
    # optimisation
    "max_steps": "optimizer steps to train for",
    "num_epochs": "passes over the training data, instead of --max-steps (may be fractional)",
    "batch_size": "rows per micro-batch (each row packs samples up to --max-length tokens)",
    "gradient_accumulation_steps": "micro-batches per optimizer step (every token weighs the same)",
    "max_length": "tokens per row, and the longest sample",
    "packing": "pack several samples into each row, with no attention across them",
    "on_overflow": "a sample longer than --max-length: truncate (and count) or refuse",
    "lr": "peak learning rate (AdamW)",
    "lora_plus_ratio": "LoRA+: learning-rate ratio of B to A (e.g. 16)",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of the steps spent warming the learning rate up from 0",
    "schedule": "learning-rate schedule after warm-up",
    "max_grad_norm": "clip the gradients' norm to this (null in a settings file: no clipping)",
    "precision": "auto = bf16 autocast where this device runs it faster, else fp32",
    "gradient_checkpointing": "recompute each layer's activations in the backward pass: less memory, slower steps",
    "compile": "torch.compile the decoder layers: faster steps after a one-off compilation (~20 s on 2 cores)",
    "seed": "random seed: adapter initialisation, data order, the held-out slice, dropout",
    "threads": "CPU threads each process computes with (default: OMP_NUM_THREADS when set, else the cores other "
               "processes leave free, checked again every few seconds); a fixed count makes runs repeat to the bit",
    "strategy": "on several processes (torchrun, --nproc-per-node): ddp replicates the model, fsdp shards it "
                "(FSDP2: each process holds 1/N of the base and the adapter)",
    # evaluation, checkpoints, logging
    "eval_steps": "score the held-out data every this many steps",
    "eval_samples": "held-out examples scored by generation (exact match); 0: loss alone",
    "save_steps": "save a checkpoint every this many steps",
    "save_total_limit": "checkpoints kept (older ones are deleted)",
    "logging_steps": "write a metrics line every this many steps",
    "progress": "show the progress bar",
    "report_to": "where to log metrics besides metrics.jsonl: tensorboard, wandb, mlflow (comma-separated) or none",
    "push_to_hub": "OWNER/NAME: upload the adapter folder to the Hugging Face hub when the run ends",
    "resume": "continue from the output folder's last checkpoint",
    "overwrite": "replace a run already in the output folder",
}


class CommaSeparated(tuple):
    """Choices for a flag that takes several of its values joined by commas (`--report-to wandb,mlflow`):
    argparse lists and checks them, and every comma-separated part must be one of them."""

    def __contains__(self, value) -> bool:
        parts = [part.strip() for part in str(value).split(",")]
        return all(part in tuple(self) for part in parts)


# TrainConfig fields with a fixed set of values; `--help` lists them and argparse refuses others.
CHOICES = {"schedule": SCHEDULES, "precision": PRECISIONS, "on_overflow": OVERFLOW, "quantize": QUANTIZE,
           "quantize_backend": QUANTIZE_BACKENDS, "report_to": CommaSeparated(REPORT_TO), "skill": tuple(SKILLS),
           "strategy": STRATEGIES}


ALIASES_OF: dict[str, list[str]] = {}
for _alias, _field in ALIASES.items():
    ALIASES_OF.setdefault(_field, []).append(_alias)


def _flag_type(field: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {int: int, float: float, str: str}.get(base, str)


def _default_text(help_text: str, default) -> str:
    """" (default: X)" for a setting's default, unless there is none or its help already says it."""
    if default is None or "(default" in help_text:
        return ""
    shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    return f" (default: {shown})"


def register(commands) -> None:
    parser = commands.add_parser("train", help="fine-tune an adapter",
                                 description="Fine-tune a LoRA adapter. Defaults: the embedded model and the "
                                             "reverse_words example skill.")
    parser.add_argument("config", nargs="?", help="YAML (or JSON) file of settings; flags override it")
    for name, field in FIELDS.items():
        # a setting's Hugging Face / TRL spellings are flags too: --lr, --learning-rate
        flags = ["--" + spelling.replace("_", "-") for spelling in (name, *ALIASES_OF.get(name, ()))]
        help_text = HELP[name] + _default_text(HELP[name], field.default)
        if field.type in ("bool", bool):
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name == "target_modules":
            parser.add_argument(*flags, dest=name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=_flag_type(field), default=None, choices=CHOICES.get(name),
                                help=help_text)
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="train on N processes of this machine (one per GPU, or N CPU processes): starts "
                             "torchrun, as `torchrun --standalone --nproc-per-node N -m lorakit train ...` does; "
                             "--batch-size is per process")
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
    if args.nproc_per_node is not None and args.nproc_per_node != 1:
        from lorakit.train.launch import launch

        return launch(args.nproc_per_node, ["train", *([args.config] if args.config else []), *_flags(given)])
    train(config, given={k: v for k, v in given.items() if v is not None})
    return 0


def _flags(given: dict) -> list[str]:
    """The flags that give `given`'s settings (those not None), for the processes torchrun starts."""
    flags = []
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags.append(f"{flag}={value}")
    return flags
