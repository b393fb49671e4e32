"""`train(config)`: the step loop of `lorakit train`, with evaluation, checkpoints and resume.

One optimizer step takes `gradient_accumulation_steps` micro-batches, each contributing its summed token
loss divided by the step's total label count, so that the update equals the one from a single batch
holding all of them (see `loss.py`). After the step: gradient clipping, AdamW, the learning-rate schedule.

Resume is exact: a checkpoint holds the adapter, optimizer, schedule, RNG states and the position in the
data (epoch, micro-batch); the batch plan is a pure function of (data, seed, epoch), so a resumed run sees
the same batches in the same order and, on the CPU with a fixed thread count (--threads or OMP_NUM_THREADS;
by default the count follows the free cores, see threads.py), ends with the bit-identical adapter.

On several processes (torchrun, see distributed.py) a step takes world_size × gradient_accumulation_steps
micro-batches of the one batch plan, each process its own run of them, and the label count that divides
the loss is the global batch's: the update equals the one-process run with that many micro-batches. Only
rank 0 writes files; checkpoints hold whole tensors and every rank's RNG state, and resume on any number
of processes that keeps the micro-batches per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from lorakit.errors import LorakitError, TrainError
from lorakit.train import checkpoint as ckpt
from lorakit.train.config import TrainConfig, check_resume_compatible, write_json_atomic
from lorakit.train.settings_file import read_config_file
from lorakit.train.evaluate import evaluate
from lorakit.train.loss import labelled_token_loss
from lorakit.train.output import OutputFolder
from lorakit.train.precision import autocast, resolve_precision
from lorakit.train.setup import (Runtime, build_datasets, build_model, build_optimizer, invocation_of, parameter_counts,
                                 resolve_data_files, skill_folder)
from lorakit.train.threads import IntraOpThreads


def resolve_config(config: TrainConfig, given: dict, world_size: int = 1) -> TrainConfig:
    """On --resume, the run's own train_config.json with the allowed changes from `given` (flags/file); on
    another number of processes than the checkpoint's, with the accumulation that keeps its global batch."""
    from lorakit.train.distributed import per_process_accumulation

    output = Path(config.output)
    saved_file = output / "train_config.json"
    if not config.resume or not saved_file.is_file():
        return config
    saved = read_config_file(saved_file)
    note = per_process_accumulation(saved, ckpt.saved_batching(output / "checkpoints"), world_size)
    if note:
        print(f"lorakit train: {note}", file=sys.stderr)
    check_resume_compatible(saved, given, saved_file)
    merged = {**saved, **{k: v for k, v in given.items() if v is not None}, "resume": True, "overwrite": False}
    merged["output"] = config.output
    return TrainConfig(**merged)


def _quantization(model) -> Optional[dict]:
    """What quantizing the base saved, for the report (None for a 16/32-bit base)."""
    report = getattr(model, "lorakit_quantization", None)
    if report is None:
        return None
    return {**dataclasses.asdict(report), "layer_ratio": round(report.layer_ratio, 4),
            "model_ratio": round(report.model_ratio, 4)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def reset_training_peak(device: torch.device) -> bool:
    """Start measuring the high-water mark afresh (loading excluded); False where this platform cannot."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: reset VmHWM to the current resident size
        return True
    except OSError:
        return False


def training_peak_mb(device: torch.device) -> float:
    """The high-water mark since reset_training_peak: CUDA allocated bytes, or resident memory (VmHWM)."""
    if device.type == "cuda":
        return peak_memory_mb(device)
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle if line.startswith("VmHWM"))
    return int(fields["VmHWM"].split()[0]) / 1024


def train_step(model, optimizer, scheduler, micro_batches, *, precision: str, device: torch.device,
               max_grad_norm: float | None, parameters, replicas=None) -> dict:
    """One optimizer step over `micro_batches`: every labelled token weighs the same (see loss.py).

    With `replicas` (distributed.Replicas) these are this process's micro-batches of a global batch: the label
    count is summed over the processes first, and the gradients are summed across them after the last one."""
    label_tokens = sum(b.label_tokens for b in micro_batches)
    tokens = sum(b.tokens for b in micro_batches)
    if replicas is not None:
        label_tokens, tokens = replicas.sum([label_tokens, tokens], torch.int64)
    loss_sum = 0.0
    for index, batch in enumerate(micro_batches):
        with autocast(precision, device):
            if replicas is None:
                loss = labelled_token_loss(model, batch)
            else:
                loss = replicas.loss(labelled_token_loss, batch, sync=index == len(micro_batches) - 1)
        (loss / max(label_tokens, 1)).backward()
        loss_sum += loss.item()
    if replicas is not None:
        replicas.check_gradients()
        (loss_sum,) = replicas.sum([loss_sum])
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm).item()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / max(label_tokens, 1), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
            "tokens": tokens, "label_tokens": label_tokens}


class StopAtStepBoundary:
    """While active, Ctrl-C (SIGINT) asks the loop to stop after the current optimizer step instead of
    interrupting it, so the checkpoint written then matches its data position exactly; a second Ctrl-C
    interrupts at once. Outside the main thread (where signals cannot be caught) it does nothing."""

    def __init__(self, announce):
        self.requested = False
        self._announce, self._previous = announce, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._announce("stopping after this step (Ctrl-C again to stop now, without a checkpoint)")

    def __enter__(self) -> "StopAtStepBoundary":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Holds one run's parts; `run()` trains to `max_steps` (or from the last checkpoint on resume)."""

    def __init__(self, config: TrainConfig, runtime: Runtime | None = None, given: dict | None = None,
                 replicas=None):
        self.runtime = runtime or Runtime.from_environment()
        self.replicas = replicas                       # distributed.Replicas on several processes, else None
        self.output = Path(config.output)
        folder = None
        if self.runtime.is_main:                       # the writer alone checks the folder and reads the run in it
            folder = OutputFolder(self.output, resume=config.resume, overwrite=config.overwrite)
            config = resolve_config(config, given or {}, self.runtime.world_size)
            config.precision = resolve_precision(config.precision, self.runtime.device)
        self.config = replicas.broadcast(config) if replicas else config
        self.threads = IntraOpThreads(self.config.threads)   # its first sample spans the set-up
        self.files = resolve_data_files(self.config)
        try:
            self._set_up()
        except BaseException:
            self.files.discard()
            raise
        # Only now, with data, targets and memory checked, does the run write anything.
        self.folder = folder
        if self.runtime.is_main:
            folder.create()
            self.files = self.files.place(skill_folder(self.config, self.output))
        self.config.data, self.config.eval_data = str(self.files.train), (
            str(self.files.heldout) if self.files.heldout else None)
        self.position = ckpt.Position()
        self._epochs: dict[int, list] = {}

    def _set_up(self) -> None:
        from lorakit.models import load_tokenizer
        from lorakit.train.memory import available_memory, estimate_training_memory, preflight

        config = self.config
        if config.push_to_hub and self.runtime.is_main:
            _check_hub_token(config.push_to_hub)
        self.precision = resolve_precision(config.precision, self.runtime.device)
        config.precision = self.precision
        self.tokenizer = load_tokenizer(config.model)
        self.data = build_datasets(config, self.files, self.tokenizer)
        self._epochs = {0: self.data.train_plan.epoch(0)}     # packed once: _next_batch starts from it
        self.batches_per_epoch = len(self._epochs[0])
        if config.num_epochs is not None:
            config.max_steps = max(1, math.ceil(config.num_epochs * self.batches_per_epoch
                                                / (config.gradient_accumulation_steps * self.runtime.world_size)))
        invocation = invocation_of(config, self.tokenizer)
        self.model = build_model(config, self.runtime, self.precision, invocation.ids if invocation else None)
        self.counts = parameter_counts(self.model)
        self.base_record = None
        if self.replicas:
            from lorakit.io.base_record import record_base

            self.base_record = record_base(self.model, "default")     # before the base is sharded
            self.replicas.wrap(self.model, config.strategy)
            if self.runtime.rank:                                     # dropout draws differ between processes
                torch.manual_seed(hash((config.seed, self.runtime.rank)) & 0xFFFF_FFFF)
        self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.memory_estimate = estimate_training_memory(
            self.model, trainable_params=self.counts["trainable_params"], batch_size=config.batch_size,
            seq_len=config.max_length, autocast_dtype=torch.bfloat16 if self.precision == "bf16" else None,
            gradient_checkpointing=config.gradient_checkpointing)
        preflight(self.memory_estimate, available_memory(self.runtime.device))

    # -- data -------------------------------------------------------------------------------------------
    def _next_rows(self) -> list:
        """The rows of the plan's next micro-batch (the position counts micro-batches of every process)."""
        while True:
            batches = self._epochs.get(self.position.epoch)
            if batches is None:
                self._epochs = {self.position.epoch: self.data.train_plan.epoch(self.position.epoch)}
                batches = self._epochs[self.position.epoch]
            if self.position.batch < len(batches):
                self.position.batch += 1
                return batches[self.position.batch - 1]
            self.position.epoch, self.position.batch = self.position.epoch + 1, 0

    # -- one optimizer step -----------------------------------------------------------------------------
    def step(self) -> dict:
        accumulation, rank = self.config.gradient_accumulation_steps, self.runtime.rank
        rows = [self._next_rows() for _ in range(accumulation * self.runtime.world_size)]
        micro = [self.data.train_plan.collate(r).to(self.runtime.device)
                 for r in rows[rank * accumulation:(rank + 1) * accumulation]]     # this process's share
        result = train_step(self.model, self.optimizer, self.scheduler, micro, precision=self.precision,
                            device=self.runtime.device, max_grad_norm=self.config.max_grad_norm,
                            parameters=self.trainable, replicas=self.replicas)
        self.position.step += 1
        self.position.tokens_seen += result["tokens"]
        if not math.isfinite(result["loss"]):
            raise TrainError(f"the loss became {result['loss']} at step {self.position.step}; lower --lr (now "
                             f"{self.config.lr}) or check the data. The last checkpoint is kept in "
                             f"{self.output / 'checkpoints'}")
        return result

    # -- evaluation and checkpoints ---------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The held-out scores; on several processes every one computes them, in step."""
        def score(model) -> dict:
            return evaluate(model, self.tokenizer, self.data.eval_set, precision=self.precision,
                            samples=self.config.eval_samples, progress=self.runtime.is_main and self.config.progress)

        with torch.random.fork_rng(devices=[]):   # scoring must not move the training RNG
            return self.replicas.run(score) if self.replicas else score(self.model)

    def _whole(self):
        """The block in which rank 0's model holds the whole adapter (every process enters it)."""
        return self.replicas.full_trainable(self.model) if self.replicas else contextlib.nullcontext()

    def save_checkpoint(self) -> None:
        from lorakit.io import save_adapter

        replicas, world = self.replicas, self.runtime.world_size
        with self._whole():
            optimizer_state = replicas.full_state(self.optimizer.state_dict()) if replicas else None
            rng = _by_rank(replicas.gather(ckpt.rng_states())) if replicas else None
            if self.runtime.is_main:
                ckpt.save_checkpoint(
                    self.output / "checkpoints", model=self.model, optimizer=self.optimizer,
                    scheduler=self.scheduler, position=self.position, keep=self.config.save_total_limit,
                    save_adapter_to=lambda path: save_adapter(self.model, path, base=self.base_record),
                    optimizer_state=optimizer_state, rng=rng,
                    batching=(world, world * self.config.gradient_accumulation_steps))

    def restore(self) -> bool:
        """Load the latest checkpoint (rank 0 reads it and sends it to the others); False when there is none."""
        contents = None
        if self.runtime.is_main:
            latest = ckpt.latest_checkpoint(self.output / "checkpoints")
            if latest is not None:
                contents = ckpt.read_checkpoint(latest, model=self.model, optimizer=self.optimizer,
                                                scheduler=self.scheduler)
        if self.replicas:
            contents = self.replicas.broadcast(contents)
        if contents is None:
            return False
        self.position, own_rng = ckpt.apply_checkpoint(
            contents, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, rank=self.runtime.rank,
            place=self.replicas.place if self.replicas else lambda tensor, like: tensor)
        if not own_rng:          # a process the saved run did not have: a stream of its own
            torch.manual_seed(hash((self.config.seed, self.runtime.rank, self.position.step)) & 0xFFFF_FFFF)
        return True

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        with self.threads:                      # torch's own thread count comes back after the run
            return self._run()

    def _run(self) -> dict:
        from lorakit.io import save_adapter
        from lorakit.io.model_card import write_model_card
        from lorakit.train.metrics import MetricsLog, Progress
        from lorakit.train.plot import plot_curves
        from lorakit.train.summary import human_summary

        config, main = self.config, self.runtime.is_main
        counts, estimate = self.counts, self.memory_estimate
        resumed = config.resume and self.restore()
        if main:
            self._print_header(resumed)
        if config.resume and not resumed and main:
            print(f"lorakit train: no checkpoint in {self.output / 'checkpoints'} yet; starting from step 0",
                  file=sys.stderr)
        try:
            if main:
                write_json_atomic(self.output / "train_config.json", config.to_dict())
            metrics = MetricsLog(self.output, enabled=main, resume_step=self.position.step if resumed else None,
                                 report_to=config.report_to, run_config=config.to_dict())
            eval_before = self._eval_before(metrics, resumed)
        except BaseException:
            if main and not resumed:
                self.folder.undo()          # nothing trained yet: leave the folder as it was found
            raise
        measuring_training_peak = reset_training_peak(self.runtime.device)
        progress = Progress(config.max_steps, initial=self.position.step, enabled=main and config.progress)
        session_tokens, session_seconds = 0, 0.0          # this process's training time, evaluation excluded
        window_tokens, window_seconds = 0, 0.0
        last_saved = self.position.step
        with StopAtStepBoundary(progress.write) as stop:
            while self.position.step < config.max_steps and not self._stopping(stop):
                began = time.perf_counter()
                result = self.step()
                took = time.perf_counter() - began
                self.threads.recheck(self.position.step)
                self.position.seconds += took
                session_tokens, session_seconds = session_tokens + result["tokens"], session_seconds + took
                window_tokens, window_seconds = window_tokens + result["tokens"], window_seconds + took
                speed = window_tokens / max(window_seconds, 1e-9)
                progress.update(self.position.step, result["loss"], speed, result["lr"])
                step = self.position.step
                if step % config.logging_steps == 0 or step == config.max_steps:
                    metrics.log({"step": step, "kind": "train", "loss": result["loss"], "lr": result["lr"],
                                 "grad_norm": result["grad_norm"], "tokens_per_second": speed,
                                 "tokens_seen": self.position.tokens_seen, "threads": self.threads.count})
                    window_tokens, window_seconds = 0, 0.0
                if step % config.eval_steps == 0 and step != config.max_steps:
                    scores = self.evaluate()
                    metrics.log({"step": step, "kind": "eval", **_scalars(scores)})
                    progress.write(_eval_line(step, scores))
                if step % config.save_steps == 0:
                    self.save_checkpoint()
                    last_saved = step
        progress.close()
        if self.position.step > last_saved:
            self.save_checkpoint()
        if self.position.step < config.max_steps:          # the loop ended early: a stop was asked for
            metrics.close()
            raise TrainError(f"interrupted at step {self.position.step}; a checkpoint is saved in "
                             f"{self.output / 'checkpoints'}: run again with --resume to go on")
        eval_after = self.evaluate()
        metrics.log({"step": self.position.step, "kind": "eval", **_scalars(eval_after)})
        report = {
            "tokens_per_second": round(session_tokens / session_seconds, 1) if session_seconds else 0.0,
            "peak_memory_mb": round(peak_memory_mb(self.runtime.device), 1),
            # the high-water mark of training and evaluation alone, loading the model excluded
            "training_peak_memory_mb": (round(training_peak_mb(self.runtime.device), 1)
                                        if measuring_training_peak else None),
            **counts,
            "adapter_bytes": 0,
            "steps": self.position.step, "tokens_seen": self.position.tokens_seen,
            "seconds": round(self.position.seconds, 2), "precision": self.precision,
            "memory_estimate_mb": round(estimate.total / 2**20, 1),
            "data": {"train": str(self.files.train), "heldout": str(self.files.heldout) if self.files.heldout
                     else f"{self.data.stats['heldout_rows']} rows held out of {self.files.train}",
                     **{k: v for k, v in self.data.stats.items() if k != "heldout_rows"}},
            "eval_before": eval_before, "eval_after": _scalars(eval_after),
            "quantization": _quantization(self.model),
            "resumed": bool(resumed), "output_dir": str(self.output), "processes": self.runtime.world_size,
            "threads": self.threads.report(),
        }
        with self._whole():
            if main:
                save_adapter(self.model, self.output, base=self.base_record)
        self._write_routing_signature()
        if main:
            report["adapter_bytes"] = (self.output / "adapter_model.safetensors").stat().st_size
            write_json_atomic(self.output / "train_report.json", report)
            write_model_card(self.output, train_config=config.to_dict(), report=report,
                             adapter_id=config.push_to_hub)
            plot_curves(metrics.records(), self.output / "curves.png")
            print(human_summary(report), file=sys.stderr)
        metrics.close()
        if main and config.push_to_hub:
            self._push()
        return report

    def _write_routing_signature(self) -> None:
        """The routing signature beside the adapter. On several processes every one computes it, in step (FSDP
        gathers weights collectively), from its own copy of the data; rank 0 keeps it, the others' go."""
        from lorakit.train.routing_signature import write_routing_signature

        if not self.replicas:
            write_routing_signature(self.model, self.tokenizer, self.config, self.files.train, self.output)
            return
        with tempfile.TemporaryDirectory(prefix="lorakit-signature-") as scratch:
            folder = self.output if self.runtime.is_main else Path(scratch)
            self.replicas.run(lambda model: write_routing_signature(model, self.tokenizer, self.config,
                                                                    self.files.train, folder))
        if not self.runtime.is_main:
            self.files.discard()           # the example skill's files this process wrote for itself

    def _stopping(self, stop: StopAtStepBoundary) -> bool:
        """Whether a stop was asked for (Ctrl-C) here or, on several processes, on any of them."""
        return self.replicas.any(stop.requested) if self.replicas else stop.requested

    def _push(self) -> None:
        from lorakit.io.push import push_adapter

        try:
            url = push_adapter(self.output, self.config.push_to_hub)
        except LorakitError as exc:
            raise TrainError(f"{exc}. The run itself is saved in {self.output}: `lorakit push {self.output} "
                             f"{self.config.push_to_hub}` uploads it") from None
        print(f"pushed to {url}", file=sys.stderr)

    def _print_header(self, resumed: bool) -> None:
        from lorakit.models import EMBEDDED_NAME
        from lorakit.train.summary import run_header

        config, stats = self.config, self.data.stats
        heldout = (f"{stats['heldout_rows']:,} held out ({self.files.heldout.name})" if self.files.heldout
                   else f"{stats['heldout_rows']:,} rows held out of it")
        print(run_header(model=config.model or EMBEDDED_NAME, precision=self.precision, r=config.r,
                         targets=config.target_modules, trainable=self.counts["trainable_params"],
                         total=self.counts["total_params"], rows=stats["train"]["examples"],
                         tokens=stats["train"]["tokens"], train_file=self.files.train.name, heldout=heldout,
                         batch_size=config.batch_size, max_length=config.max_length,
                         accumulation=config.gradient_accumulation_steps, steps=config.max_steps,
                         batches_per_epoch=self.batches_per_epoch, output=str(self.output),
                         resumed_step=self.position.step if resumed else None,
                         processes=self.runtime.world_size), file=sys.stderr)

    def _eval_before(self, metrics, resumed: bool) -> dict:
        """The base model's scores (adapter off) at step 0; on resume, the ones recorded by the first run."""
        if resumed:
            first = next((r for r in metrics.records() if r.get("kind") == "eval" and r.get("step") == 0), None)
            if self.replicas:                      # rank 0 holds the metrics: every process follows its answer
                first = self.replicas.broadcast(first)
            if first is not None:
                return {k: v for k, v in first.items() if k not in ("step", "kind", "time")}
        from lorakit.core import disable_adapters

        with disable_adapters(self.model):
            scores = _scalars(self.evaluate())
        metrics.log({"step": 0, "kind": "eval", **scores})
        return scores


def _check_hub_token(repo_id: str) -> None:
    """--push-to-hub needs a token: found missing before training, not after it."""
    from huggingface_hub import get_token

    if not get_token():
        raise TrainError(f"--push-to-hub {repo_id} needs a Hugging Face token: set HF_TOKEN or log in once with "
                         "`hf auth login` (or train without --push-to-hub and `lorakit push` later)")


def _scalars(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if isinstance(v, (int, float))}


def _eval_line(step: int, scores: dict) -> str:
    parts = [f"step {step}: eval loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f}"]
    if "exact_match" in scores:
        parts.append(f"exact match {100 * scores['exact_match']:.1f}% of {scores['exact_match_samples']}")
    return ", ".join(parts)


def _by_rank(states: list[dict]) -> dict:
    """Every process's RNG states in one flat dict: rank 0's under their own names, rank r's as "rank<r>.name"."""
    return {(f"rank{rank}.{name}" if rank else name): state
            for rank, named in enumerate(states) for name, state in named.items()}


def train(config: TrainConfig, given: dict | None = None) -> dict:
    """Run `lorakit train` with a resolved config; returns the train report. Under torchrun (WORLD_SIZE > 1)
    this process joins the others and trains its share (see distributed.py)."""
    runtime = Runtime.from_environment()
    if runtime.world_size == 1:
        return Trainer(config, runtime, given=given).run()
    from lorakit.train.distributed import Replicas

    with Replicas.join(runtime) as replicas:
        return Trainer(config, runtime, given=given, replicas=replicas).run()
