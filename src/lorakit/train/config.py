"""`TrainConfig`: every setting of a `lorakit train` run, from defaults, a YAML file and flags.

Precedence: defaults < YAML file < command-line flags. The resolved config is written to the run's
`train_config.json`, so a run can be reproduced (`lorakit train OUTPUT/train_config.json`) and resumed
(`--resume` reloads it and refuses flags that would change what is being computed).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from lorakit.errors import TrainError

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
OVERFLOW = ("truncate", "refuse")
QUANTIZE = ("nf4", "int8")
QUANTIZE_BACKENDS = ("auto", "torch", "bitsandbytes")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    # what to train on
    model: Optional[str] = None              # hub id or local folder; None = the embedded model
    trust_pickle: bool = False               # also load pickle weights (*.bin): they can run code, so trusted only
    data: Optional[str] = None               # jsonl/json/csv/parquet/datasets folder; None = an example skill
    eval_data: Optional[str] = None          # held-out file; None = a held-out slice of `data`
    skill: str = "reverse_words"             # the example skill used when `data` is None
    chat: bool = False                       # example skill in chat-messages form instead of prompt/completion
    output: str = "lorakit-run"
    prompt_column: Optional[str] = None      # the data's column holding the prompt (default "prompt")
    completion_column: Optional[str] = None  # ... the completion (default "completion")
    messages_column: Optional[str] = None    # ... the chat messages (default "messages")
    text_column: Optional[str] = None        # ... plain text (default "text")
    # the adapter
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    alora_invocation: Optional[str] = None   # activated LoRA: the update starts at this text's tokens in each row
    alora_insert: bool = False               # with alora_invocation: append it to the prompts that lack it
    quantize: Optional[str] = None           # frozen base in "nf4" (QLoRA) or "int8"; None = 16/32-bit
    quantize_backend: str = "auto"           # auto = bitsandbytes where it runs, else the torch path
    quantize_embeddings: bool = False        # with quantize: the embedding table and output head too
    # optimisation
    max_steps: int = 1000                    # optimizer steps (derived from num_epochs when that is set)
    num_epochs: Optional[float] = None       # passes over the training data; sets max_steps from the data
    batch_size: int = 4                      # rows per micro-batch (packed rows of max_length tokens)
    gradient_accumulation_steps: int = 1
    max_length: int = 256                    # tokens per row (and per sample)
    packing: bool = True                     # several samples per row, no attention across them
    on_overflow: str = "truncate"            # a sample longer than max_length: "truncate" or "refuse"
    lr: float = 3e-3
    lora_plus_ratio: Optional[float] = None  # LoRA+: B learns this many times faster than A (e.g. 16)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    max_grad_norm: Optional[float] = 1.0
    precision: str = "auto"                  # auto = bf16 autocast where the device runs it faster
    gradient_checkpointing: bool = False
    compile: bool = False                    # torch.compile the decoder layers (pays off after a few hundred steps)
    seed: int = 0
    strategy: str = "ddp"                    # on several processes (torchrun): "ddp" replicates, "fsdp" shards
    threads: Optional[int] = None            # CPU threads per process; None = the free cores (train/threads.py)
    # evaluation, checkpoints, logging
    eval_steps: int = 250
    eval_samples: int = 100                  # held-out examples scored by generation (exact match)
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 10
    progress: bool = True
    report_to: Union[str, list[str]] = "tensorboard"  # also wandb, mlflow; "none" for metrics.jsonl alone
    push_to_hub: Optional[str] = None        # OWNER/NAME: upload the adapter folder when the run ends
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from lorakit.train.settings_file import coerce

        for name in FIELDS:
            setattr(self, name, coerce(name, getattr(self, name), where=name))
        if isinstance(self.report_to, str):
            self.report_to = [part.strip() for part in self.report_to.split(",") if part.strip()]
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown or ("none" in self.report_to and len(self.report_to) > 1):
            raise TrainError(f"report_to takes {', '.join(REPORT_TO)} (several with commas, or none alone); got "
                             f"{', '.join(self.report_to) or 'nothing'}")
        if self.push_to_hub is not None:
            from lorakit.models import HUB_ID

            if not HUB_ID.fullmatch(self.push_to_hub):
                raise TrainError(f"push_to_hub takes a hub repository id OWNER/NAME; got {self.push_to_hub!r}")
        positive = ("r", "max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "eval_steps",
                    "save_steps", "save_total_limit", "logging_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TrainError(f"{name} must be a positive whole number; got {value!r}")
        if not 0 <= self.eval_samples:
            raise TrainError(f"eval_samples must be >= 0; got {self.eval_samples!r}")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"threads must be a positive whole number (or unset: the free cores); got "
                             f"{self.threads!r}")
        if self.num_epochs is not None and not self.num_epochs > 0:
            raise TrainError(f"num_epochs must be > 0; got {self.num_epochs!r}")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0; got {self.lr!r}")
        if not 0 <= self.lora_dropout < 1:
            raise TrainError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            raise TrainError(f"lora_plus_ratio must be > 0; got {self.lora_plus_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise TrainError(f"max_grad_norm must be > 0 (or null to switch clipping off); got {self.max_grad_norm!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise TrainError(f"quantize must be one of {', '.join(QUANTIZE)} (or unset); got {self.quantize!r}")
        if self.quantize is not None and self.use_dora:
            raise TrainError("use_dora with a quantized base is not supported: DoRA needs the base weight's exact "
                             "column norms; train DoRA without --quantize")
        if self.alora_invocation is not None:
            if not isinstance(self.alora_invocation, str) or not self.alora_invocation.strip():
                raise TrainError("alora_invocation must be the (non-empty) text that starts the adapter's turn")
            if self.use_dora:
                raise TrainError("alora_invocation with use_dora: an activated LoRA is a plain LoRA update that starts "
                                 "at its invocation; DoRA rescales every position. Choose one.")
        elif self.alora_insert:
            raise TrainError("alora_insert needs alora_invocation: the text to insert")
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("on_overflow", OVERFLOW),
                              ("quantize_backend", QUANTIZE_BACKENDS), ("strategy", STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise TrainError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_sources(cls, file: Optional[Union[str, Path]] = None, overrides: Optional[dict] = None) -> "TrainConfig":
        """Defaults, then the YAML/JSON file, then `overrides` (flags: None means not given)."""
        from lorakit.train.settings_file import read_config_file

        values = read_config_file(file) if file else {}
        flags = {k: v for k, v in (overrides or {}).items() if v is not None}
        if "num_epochs" in flags and "max_steps" in flags:
            raise TrainError(f"both --max-steps ({flags['max_steps']}) and --num-epochs ({flags['num_epochs']}) "
                             "are given: give one")
        if "max_steps" in flags:
            values.pop("num_epochs", None)       # a flag's choice of run length wins over the file's
        values.update(flags)
        return cls(**values)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Settings a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = {"eval_steps", "eval_samples", "save_steps", "save_total_limit", "logging_steps",
                     "progress", "resume", "overwrite", "output", "trust_pickle", "report_to", "push_to_hub",
                     "strategy", "threads"}


def _same_setting(key: str, saved: Any, requested: Any) -> bool:
    if key in ("data", "eval_data") and saved and requested:
        return Path(saved).resolve() == Path(requested).resolve()
    if key == "precision" and requested == "auto":
        return True   # the saved value is what "auto" resolved to on this run
    return saved == requested


def check_resume_compatible(saved: dict[str, Any], requested: dict[str, Any], source: Path) -> None:
    """Refuse a resume whose flags change the computation (model, data, hyperparameters, seed)."""
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in requested.items()
               if v is not None and k not in RESUMABLE_CHANGES and k in saved and not _same_setting(k, saved[k], v)]
    if changed:
        raise TrainError(f"--resume continues the run recorded in {source}, but these settings differ: "
                         f"{'; '.join(changed)}. Drop those flags to resume, or start a new run in another "
                         f"--output (or with --overwrite)")


def write_json_atomic(path: Path, data: Any) -> None:
    from lorakit.io.safetensors_file import atomic_write

    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))
