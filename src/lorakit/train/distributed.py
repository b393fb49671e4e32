"""`lorakit train` on several processes (torch.distributed): one process per device, DDP or FSDP2.

torchrun (or `lorakit train --nproc-per-node N`, which starts it) runs `lorakit train` once per process
and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `Replicas.join` joins the process
group (gloo on CPUs, nccl on GPUs) and leaves it when the run ends.

The global batch. Every process plans the same micro-batches (data.BatchPlan depends on the data, seed and
epoch alone); an optimizer step takes the next W·k of them (W processes, k = gradient accumulation) and
process r computes the r-th run of k. So a step sees the same rows whatever W is, as long as W·k is the
same, and a run on W processes equals the one-process run with W× the accumulation.

Exactness. With n the global batch's label count (summed over processes before the backward pass, not
averaged per process) and ℓ_i the summed token loss of micro-batch i, every process back-propagates
ℓ_i / n for its own micro-batches, and the gradients are *summed* across processes (DDP with a
sum-not-average comm hook; FSDP2 with a gradient divide factor of 1). The result is Σ_i ∇ℓ_i / n, the
one-process gradient, up to the order of fp32 additions.

    ddp   the model is replicated; only the adapter's gradients travel (one all-reduce per step).
    fsdp  FSDP2 (`fully_shard`): every repeated block (decoder layer) is one unit and the rest of the
          model another; each process holds 1/W of every floating-point weight, the frozen base with the
          adapter, and all-gathers a unit's weights while it runs. Parameters keep their dtypes: the
          adapter trains in fp32 over a bf16 or fp32 base. Weights FSDP cannot split (quantized
          storage, non-float) stay whole on every process.

Saving gathers the full adapter on rank 0, which alone writes; evaluation runs on every process in step
(the same batches), since FSDP gathers weights collectively. A failure on any process stops them all:
the failing one leaves its message in the job's store and every other process, watching it, exits with
that message instead of waiting in a collective that will never complete (torchrun's agent only stops
the processes of its own node).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LorakitError, TrainError

FAILURE_KEY = "lorakit/failure"


class Network(nn.Module):
    """The module DDP and FSDP wrap: its forward runs `function(model, ...)`, so that the token loss (which
    calls the decoder and the output head apart) and the evaluation both pass through the wrapper's hooks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, function: Callable, *args, **kwargs):
        return function(self.model, *args, **kwargs)


class Replicas:
    """This process's part in a run on `world_size` processes: collectives, the wrapped model, saving."""

    def __init__(self, runtime) -> None:
        self.rank, self.world_size, self.device = runtime.rank, runtime.world_size, runtime.device
        self.is_main = runtime.is_main
        self.strategy: Optional[str] = None
        self.network: Optional[nn.Module] = None
        self._model: Optional[nn.Module] = None
        self._gradients_checked = False

    # -- joining and leaving ------------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def join(cls, runtime) -> Iterator["Replicas"]:
        """Join the process group for the block; an exception raised in it stops every process."""
        cuda = runtime.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(runtime.device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=runtime.device if cuda else None)
        watch = FailureWatch(runtime.rank)
        try:
            yield cls(runtime)
        except BaseException as exc:
            watch.announce(exc)
            raise
        finally:
            # Leave nothing for the interpreter's exit to tear down: the failure watch lets go of the store, and
            # the run's wrapped model (DDP's reducer, FSDP's state: cycles that only the collector frees) goes
            # while the process group and the interpreter are still whole. Gloo work destroyed during
            # interpreter finalization aborts the process (SIGABRT) after a run that succeeded.
            watch.stop()
            gc.collect()
            dist.destroy_process_group()

    # -- the model --------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, strategy: str) -> nn.Module:
        """`model` under DDP or FSDP2 (see the module's docstring); returns the network to run it through."""
        self.strategy, self._model = strategy, model
        network = Network(model)
        if strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import FSDPModule, fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            whole = {p for p in model.parameters() if not p.is_floating_point()}
            for block in repeated_blocks(model):
                fully_shard(block, mesh=mesh, ignored_params=whole or None)
            fully_shard(network, mesh=mesh, ignored_params=whole or None)
            for unit in network.modules():
                if isinstance(unit, FSDPModule):
                    unit.set_gradient_divide_factor(1.0)     # sum the gradients: the loss is already / n
                    unit.set_force_sum_reduction_for_comms(True)   # a plain sum (gloo has no PREMUL_SUM)
        else:
            from torch.nn.parallel import DistributedDataParallel

            # Every process builds the same model from the same seed; rank 0's adapter is sent to the
            # others all the same (a few MB), while the frozen base is not broadcast at all.
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad:
                        dist.broadcast(param.data, src=0)
            device_ids = [self.device] if self.device.type == "cuda" else None
            network = DistributedDataParallel(network, device_ids=device_ids, init_sync=False,
                                              forward_sync_buffers=False)
            network.register_comm_hook(None, _sum_gradients)
        self.network = network
        return network

    def loss(self, loss_of: Callable, batch, *, sync: bool) -> torch.Tensor:
        """`loss_of(model, batch)` through the wrapper; the gradients of its backward pass are summed across
        processes when `sync` (the step's last micro-batch), else they accumulate here."""
        if self.strategy == "fsdp":
            self.network.set_requires_gradient_sync(sync)
            return self.network(loss_of, batch)
        with contextlib.nullcontext() if sync else self.network.no_sync():
            return self.network(loss_of, batch)

    @torch.no_grad()
    def run(self, function: Callable, *args, **kwargs):
        """`function(model, ...)` on every process in step (evaluation): through FSDP's root, which gathers the
        weights it needs; a DDP replica runs it as is."""
        if self.strategy == "fsdp":
            return self.network(function, *args, **kwargs)
        return function(self._model, *args, **kwargs)

    def check_gradients(self) -> None:
        """After the first backward pass: every adapter parameter here received a gradient, or the run stops
        naming the modules that did not (they would never train, and DDP would wait for them forever)."""
        if self._gradients_checked:
            return
        self._gradients_checked = True
        missing = [name for name, p in self._model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            modules = sorted({name.split(".lora_")[0] for name in missing})
            shown = ", ".join(modules[:5]) + (f" and {len(modules) - 5} more" if len(modules) > 5 else "")
            raise TrainError(f"after the first step {len(missing)} adapter parameter(s) have no "
                             f"gradient, in {shown}: the forward pass never used them, so they would not train. "
                             "Target modules the model runs (--target-modules)")

    # -- collectives ------------------------------------------------------------------------------------
    def sum(self, values: list, dtype: torch.dtype = torch.float64) -> list:
        """The element-wise sum of `values` over every process (int64 for counts: exact)."""
        total = torch.tensor(values, dtype=dtype, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([int(flag)], torch.int64)[0] > 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object), on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every process's `value`, in rank order, on every process."""
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    # -- full tensors for saving, shards for loading -----------------------------------------------------
    @contextlib.contextmanager
    def full_trainable(self, model: nn.Module) -> Iterator[None]:
        """Within the block, rank 0's model holds every trainable parameter whole (FSDP shards gathered from
        every process, which must all enter the block); outside it, the shards again. Nothing to do for DDP."""
        from torch.distributed.tensor import DTensor

        entries = [(module, key, param) for module in model.modules() for key, param in module._parameters.items()
                   if isinstance(param, DTensor) and param.requires_grad]
        whole = [param.full_tensor() for _, _, param in entries]              # collective, in the same order
        if self.is_main:
            for (module, key, _), tensor in zip(entries, whole):
                module._parameters[key] = nn.Parameter(tensor, requires_grad=True)
        try:
            yield
        finally:
            for module, key, param in entries:
                module._parameters[key] = param

    def full_state(self, state: dict) -> dict:
        """An optimizer's state_dict with every sharded tensor gathered whole (a collective)."""
        return {**state, "state": {index: {name: full_tensor(value) for name, value in values.items()}
                                   for index, values in state["state"].items()}}

    @staticmethod
    def place(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A whole tensor (the same on every process) as `like` holds it: this process's shard of an FSDP
        parameter, or the tensor itself."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(like, DTensor) and tuple(tensor.shape) == tuple(like.shape):
            return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return tensor


def full_tensor(value):
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the model's stacks of identical blocks (decoder layers), outermost stacks only."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            blocks.extend(module)
            inside.update(id(m) for block in module for m in block.modules())
    return blocks


def _sum_gradients(state, bucket):
    """DDP comm hook: all-reduce a bucket of gradients as a sum (DDP's own hook divides by the world size)."""
    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def per_process_accumulation(saved: dict, batching: Optional[tuple[int, int]], world_size: int) -> Optional[str]:
    """Resuming on another number of processes: set `saved["gradient_accumulation_steps"]` so that a step
    still takes the checkpoint's micro-batches per step; returns a note saying so (None when nothing changed).

    batching: (processes, micro-batches per step) the checkpoint was saved with (micro-batches None: not
    recorded, a single-process run's), None without a checkpoint.
    """
    if batching is None or batching[0] == world_size:
        return None
    processes, per_step = batching
    per_step = per_step or processes * saved.get("gradient_accumulation_steps", 1)
    if per_step % world_size:
        raise TrainError(f"the checkpoint was saved by {processes} process(es) taking {per_step} micro-batches per "
                         f"step, which {world_size} processes cannot share evenly; resume on a number of processes "
                         f"that divides {per_step}")
    before = saved.get("gradient_accumulation_steps")
    saved["gradient_accumulation_steps"] = per_step // world_size
    return (f"resuming a run saved by {processes} process(es) on {world_size}: gradient accumulation {before} -> "
            f"{per_step // world_size}, so that a step still takes {per_step} micro-batches")


class FailureWatch:
    """The first process to fail writes "rank R: message" into the job's key-value store (the TCPStore at
    MASTER_ADDR:MASTER_PORT); every other process watches for it in a thread of its own and exits with that
    message. The message also goes to torchrun's error file, so its summary names the cause."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None
        try:
            store = _store_client()
        except Exception:           # no store to reach (an unusual launcher): torchrun still stops the node
            return
        self._thread = threading.Thread(target=self._watch, args=(store,), name="lorakit-failure-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching, and wait for the thread to let go of the store before the interpreter exits."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _watch(self, store, every: float = 0.5) -> None:
        while not self._stopped.is_set():  # polled: a blocking wait that times out makes c10d log a warning each time
            try:
                if store.check([FAILURE_KEY]):
                    break
            except Exception:       # the store is gone: the job has ended
                return
            self._stopped.wait(every)
        else:
            return                  # this process is done with the run
        try:
            failure = json.loads(store.get(FAILURE_KEY))
        except Exception:
            return
        if failure.get("rank") == self.rank:
            return
        message = failure.get("message", "another process failed")
        if os.environ.get("LOCAL_RANK", "0") == "0":          # once per machine
            print(f"lorakit train: error: {message}", file=sys.stderr, flush=True)
        write_error_file(message)
        os._exit(2)

    def announce(self, exc: BaseException) -> None:
        """Tell every process that this one failed with `exc` (the first failure wins)."""
        if isinstance(exc, KeyboardInterrupt):
            text = "interrupted"
        else:
            text = str(exc) if isinstance(exc, LorakitError) else f"{type(exc).__name__}: {exc}"
        message = f"rank {self.rank}: {text}"
        write_error_file(message)
        try:
            _store_client().compare_set(FAILURE_KEY, "", json.dumps({"rank": self.rank, "message": message}))
        except Exception:
            pass


def _store_client():
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=30), wait_for_workers=False)


def write_error_file(message: str) -> None:
    """torchrun's error file for this process (its summary shows the message), where torchrun asked for one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        with open(path, "w") as handle:
            json.dump({"message": message, "timestamp": int(time.time())}, handle)
    except OSError:
        pass
