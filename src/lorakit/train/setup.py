"""Build everything a training run needs, in one place: data, model with adapter, optimizer, schedule.

Keeping construction here, apart from the step loop, is what lets torch.distributed slot in later: a DDP
or FSDP wrapper goes around the model, a sampler shard around the batch plan, and the loop stays as is.
Nothing here keeps global state; `Runtime` says which process this is, and only rank 0 writes files.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lorakit.core import LoraConfig, add_adapter, trainable_parameters
from lorakit.errors import TrainError
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import EvalSet, build_eval_set
from lorakit.train.precision import training_attention

SKILL_DATA_SEED = 0          # the example skills' files are the same for every run, so runs compare


@dataclass(frozen=True)
class Runtime:
    """This process's place in a (possibly single-process) job, read from torchrun's environment."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Runtime":
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return cls(rank, world, torch.device("cuda", local))
        return cls(rank, world, torch.device("cpu"))


@dataclass
class DataFiles:
    train: Path
    heldout: Optional[Path]          # None: a held-out slice of `train` is used
    staged: Optional[Path] = None    # the example skill's files, written here until the output folder exists

    def place(self, folder: Path) -> "DataFiles":
        """Move staged skill files into `folder` (replacing an earlier copy); the files' new paths."""
        if self.staged is None:
            return self
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.staged), str(folder))
        return DataFiles(folder / self.train.name, folder / self.heldout.name if self.heldout else None)

    def discard(self) -> None:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)


def resolve_data_files(config: TrainConfig) -> DataFiles:
    """The files to train and evaluate on; with no --data, the example skill's, written to a staging folder
    that `DataFiles.place` moves to `<output>/data/<skill>` once the run is set up."""
    if config.data is None:
        from lorakit.data.skills import write_skill

        staged = Path(tempfile.mkdtemp(prefix=f"lorakit-{config.skill}-"))
        try:
            paths = write_skill(config.skill, staged, seed=SKILL_DATA_SEED)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        key = "_chat" if config.chat else ""
        return DataFiles(Path(paths["train" + key]), Path(paths["heldout" + key]), staged)
    return DataFiles(Path(config.data).resolve(), Path(config.eval_data).resolve() if config.eval_data else None)


def skill_folder(config: TrainConfig, output: Path) -> Path:
    return output.resolve() / "data" / config.skill


def data_columns(config: TrainConfig) -> dict[str, str]:
    """--prompt-column and friends, as read_rows' {lorakit field: the data's column}."""
    named = {"prompt": config.prompt_column, "completion": config.completion_column,
             "messages": config.messages_column, "text": config.text_column}
    return {field: column for field, column in named.items() if column is not None}


def split_heldout(rows: list, seed: int) -> tuple[list, list]:
    """A seeded held-out slice (5%, at most 200 rows, at least 1) when no held-out file is given."""
    if len(rows) < 2:
        raise TrainError(f"{rows[0].source.rsplit(':', 1)[0] if rows else 'the data'} holds {len(rows)} row(s): "
                         "too few to hold some out; give --eval-data or more rows")
    count = max(1, min(200, len(rows) // 20))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


@dataclass
class Datasets:
    train_plan: object
    eval_set: EvalSet
    stats: dict


def build_datasets(config: TrainConfig, files: DataFiles, tokenizer) -> Datasets:
    """Tokenized training batches and the held-out EvalSet (tokenize_rows refuses data with nothing to learn)."""
    from lorakit.data import BatchPlan, read_rows, tokenize_rows

    columns = data_columns(config)
    rows = read_rows(files.train, columns)
    held = read_rows(files.heldout, columns) if files.heldout else None
    if held is None:
        rows, held = split_heldout(rows, config.seed)
    examples, stats = tokenize_rows(rows, tokenizer, config.max_length, config.on_overflow)
    invocation = invocation_of(config, tokenizer)
    if invocation is not None:   # each row's update starts at its own invocation: rows are not packed together
        examples, stats["invocation_inserted"] = invocation.prepare(examples, config.max_length, str(files.train),
                                                                    tokenizer)
    train_plan = BatchPlan(examples, batch_size=config.batch_size, max_length=config.max_length,
                           pad_id=tokenizer.pad_token_id, seed=config.seed,
                           packing=config.packing and invocation is None)
    eval_set = build_eval_set(held, tokenizer, max_length=config.max_length, batch_size=config.batch_size,
                              samples=config.eval_samples, invocation=invocation)
    return Datasets(train_plan, eval_set, {"train": stats, "heldout_rows": len(held)})


def invocation_of(config: TrainConfig, tokenizer):
    """The run's aLoRA invocation (its text, token ids, and whether to insert it), or None."""
    from lorakit.data.invocation import Invocation

    if config.alora_invocation is None:
        return None
    return Invocation.of(config.alora_invocation, tokenizer, insert=config.alora_insert)


def build_model(config: TrainConfig, runtime: Runtime, precision: str, invocation_ids=None):
    """The base model with a fresh adapter: base frozen (in bf16 when computing in bf16; its linear layers in
    NF4 or int8 with `quantize`), adapter in fp32."""
    from lorakit.models import load_model

    torch.manual_seed(config.seed)
    # A base to be quantized loads straight in the compute dtype: no fp32 copy on the way to 4 bits.
    load_dtype = torch.bfloat16 if config.quantize and precision == "bf16" else torch.float32
    model = load_model(config.model, dtype=load_dtype, device=runtime.device, trust_pickle=config.trust_pickle)
    if config.quantize:
        from lorakit.quant import quantize_model

        # Each layer dequantizes through large transient buffers in every step; served from glibc's heap they
        # are never given back and the resident peak ends above a bf16 base's (measured: 1,665 vs 1,535 MB on a
        # 0.3B model). Served by mmap, they are (1,072 MB). A process setting, made here for `lorakit train`.
        _large_allocations_from_mmap()
        # QLoRA: the frozen linear layers in 4 (or 8) bits, computing in the training precision.
        model.lorakit_quantization = quantize_model(model, config.quantize, config.quantize_backend,
                                                    embeddings=config.quantize_embeddings)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules, use_rslora=config.use_rslora, use_dora=config.use_dora,
                      alora_invocation_tokens=list(invocation_ids) if invocation_ids else None,
                      task_type="CAUSAL_LM" if invocation_ids else None)
    add_adapter(model, lora)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(training_attention(precision, runtime.device, config.max_length))
    if precision == "bf16":
        # Frozen weights are only read, so storing them in bf16 halves their memory and spares autocast a
        # cast of every weight on every step; the adapter (what is learned) stays fp32.
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if config.gradient_checkpointing:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):      # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        model.config.use_cache = False
    if config.compile:
        compile_decoder_layers(model)
    model.train()
    return model


def _large_allocations_from_mmap(threshold: int = 1 << 20) -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def compile_decoder_layers(model) -> int:
    """`torch.compile` each decoder layer in place (it fuses the norms, rotary, SwiGLU and casts between the
    matmuls); returns how many were compiled. The first step pays the compilation (~20 s on 2 CPU cores)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TrainError(f"--compile knows decoder stacks at model.model.layers; {type(model).__name__} has none. "
                         "Train without --compile")
    for layer in layers:
        layer.compile()
    return len(layers)


def build_optimizer(config: TrainConfig, model):
    """AdamW over the adapter; with LoRA+ the B matrices learn `lora_plus_ratio` times faster than A."""
    from lorakit.train.schedule import lr_schedule

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.lora_plus_ratio:
        b_params = [p for n, p in named if ".lora_B." in f".{n}."]
        others = [p for n, p in named if ".lora_B." not in f".{n}."]
        groups = [{"params": others, "lr": config.lr},
                  {"params": b_params, "lr": config.lr * config.lora_plus_ratio}]
    else:
        groups = [{"params": [p for _, p in named], "lr": config.lr}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(round(config.warmup_ratio * config.max_steps))
    scheduler = lr_schedule(optimizer, config.schedule, warmup, config.max_steps)
    return optimizer, scheduler


def parameter_counts(model) -> dict:
    """Trainable and total parameters; a quantized base's weights count as the parameters they stand for."""
    trainable, total = trainable_parameters(model)
    report = getattr(model, "lorakit_quantization", None)
    return {"trainable_params": trainable, "total_params": total + (report.quantized_params if report else 0)}
