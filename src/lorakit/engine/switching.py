"""Merged or unmerged: which weights each decode step runs on, chosen per step from measured costs.

Unmerged, every row of a batch adds its own adapter's update (`lora_slots.py`): one step serves any mix
of adapters, and pays LoRA work on every row. Merged, the adapted projections of one adapter (or
mixture) hold `W + s·B A` and its rows run with no LoRA work, at the base model's cost; no other
adapter's row can share that step. A *lane* is what a sequence runs: the base (no adapter), one
adapter, or one mixture, i.e. its (AdapterInfo, weight) pairs.

Policies: two choices, when lanes take turns and when a lane's steps run merged.

    policy          turns                          merging
    "off"           never: arrival order           never
    "merged"        never: arrival order           whenever every row of a batch is on one lane
    "auto"          while requests contend         where the measured costs say it pays (dLoRA's
                    for the rows                   credit-based batching, Wu et al., OSDI '24)
    "turns-merged"  always                         always (dLoRA's merge-only policy; a reference for
                                                   benchmarks/switching.py, not an engine setting)

The first three are `EngineConfig.switching`'s values: "off" and "merged" are the two fixed modes a
server could be set to (unmerged, or merged wherever a batch allows it); "auto" reorders the queue to
make merged batches, and merges them only where that pays.

A *turn* of lane d: only d's requests are admitted; the other lanes' running rows finish (no request is
preempted), and once every running row is d's, steps run merged (if the turn merges). A request of
another lane is *held* from the first step at which a cache row was free for it and it was passed
over. The turn ends when a held request has been held `hold` seconds (the starvation bound: its
credit, in dLoRA's terms; a request held that long is admitted at the next free row whatever the turn),
when d has no work left, or when d has nothing waiting while rows are free and others wait. The next
turn is the lane of the longest-held request, else of the oldest one, so the held go first and a
request waits at most about `hold` plus one request's decoding longer than in arrival order.

"auto" takes turns only while more requests wait than rows are free (at lower load it admits in arrival
order and holds no one), or when every request is on one lane. Turns pay even unmerged: a batch on few
adapters reads fewer factors than one on many. A turn merges when its lane's measured saving per step

    saving = 1 - (merged step seconds) / (unmerged step seconds)      (medians, at this batch size)

over the steps the turn can last beats twice the measured cost of merging:

    saving · unmerged_step · min(hold / unmerged_step, pending_d / rows) > 2 · merge_cost

(a kept copy costs nothing); never measured, a turn with PROBE_MIN_STEPS steps of work merges to
measure it. A measured saving below MIN_SAVING (a GPU where LoRA work is cheap, say) stops merging;
it is measured again every PROBE_EVERY steps. `hold` is `max_hold` seconds if given, else
HOLD_REQUESTS times the measured time a request takes to decode (its mean generated tokens times the
unmerged step time), at least MIN_HOLD: a turn must outlast the other lanes' rows draining (about one
request's decoding) to run merged at all, and at 8 requests' time it can run merged about 7/8 of the
time, on any machine and model (benchmarks/switching.py: 4 requests' time gave less, and auto's longest
wait stayed below the unmerged engine's p99 wait with 8).

Exactness: the base weights are never written. Merging builds `W + ΔW` for the adapted groups only, in
new memory (`DecoderRunner.merged_weights`); unmerging goes back to the kept base tensors, never
`(W + ΔW) - ΔW`, so the base stays bit-identical however many switches happen, and a merged step's
logits equal the unmerged step's to fp32 rounding (tested: identical greedy tokens). One merged copy is
kept (the last lane merged), so switching back to the same lane costs nothing; its memory is one copy of
that adapter's adapted projections.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:
    from lorakit.engine.lora_slots import LoraSlots
    from lorakit.engine.runner import DecoderRunner, Weights
    from lorakit.engine.sequence import Sequence

SWITCHING_MODES = ("auto", "off", "merged")
POLICIES = {"off": ("never", "never"), "merged": ("never", "always"), "auto": ("contended", "measured"),
            "turns-merged": ("always", "always")}  # policy -> (when lanes take turns, when a turn merges)
HOLD_REQUESTS = 8       # the default bound on holding a request back, in requests' decode times
MIN_HOLD = 1.0          # seconds: the default bound's floor, and the bound before anything is measured
MIN_SAVING = 0.02       # a merged step must save at least this share of an unmerged one to be worth it
PROBE_EVERY = 2000      # steps after which "auto" measures merged steps again when they did not pay
PROBE_MIN_STEPS = 16    # decode steps of pending work a lane needs before a merge is tried unmeasured
SAMPLES = 16            # recent decode steps whose median stands for a batch size's step time
SMOOTHING = 0.2         # weight of the newest request in the moving average of request lengths
MEASURED_STEPS = 8      # merged steps a phase runs before its measured saving may end it

Lane = tuple  # a sequence's (AdapterInfo, weight) pairs: () the base, one adapter, or a mixture


def lane_of(seq: "Sequence") -> Lane:
    return seq.adapters


def lane_name(lane: Lane) -> str:
    """"base", an adapter's name, or a mixture as name:weight+name:weight."""
    if not lane:
        return "base"
    if len(lane) == 1 and lane[0][1] == 1.0:
        return lane[0][0].name
    return "+".join(f"{info.name}:{weight:g}" for info, weight in lane)


@dataclass
class SwitchingStats:
    """What /metrics shows of the switching: the lane merged now (None: unmerged), how many times steps
    went from unmerged to merged weights or back, and the engine seconds spent on merged weights."""

    merged_lane: Optional[str] = None
    switches: int = 0
    merged_seconds: float = 0.0
    merges_built: int = 0
    merge_seconds: float = 0.0


class StepTimes:
    """Decode step seconds by (merged, rows in the batch): the median of the last SAMPLES of each, so that
    a step slowed by something else (a collection, another process) does not swing a decision."""

    def __init__(self):
        self.samples: dict[tuple[bool, int], deque[float]] = {}

    def add(self, merged: bool, rows: int, seconds: float) -> None:
        self.samples.setdefault((merged, rows), deque(maxlen=SAMPLES)).append(seconds)

    def forget_merged(self) -> None:
        self.samples = {key: value for key, value in self.samples.items() if not key[0]}

    def _median(self, merged: bool, rows: int) -> float:
        return statistics.median(self.samples[merged, rows])

    def unmerged(self, rows: int) -> Optional[float]:
        """Unmerged step seconds at the measured batch size nearest `rows`; None if none was measured."""
        n = _nearest([n for merged, n in self.samples if not merged], rows)
        return None if n is None else self._median(False, n)

    def saving(self, rows: int) -> Optional[float]:
        """1 - merged / unmerged step seconds at the batch size nearest `rows` measured both ways; None if none."""
        n = _nearest([n for merged, n in self.samples if merged and (False, n) in self.samples], rows)
        return None if n is None else 1.0 - self._median(True, n) / self._median(False, n)


def _nearest(sizes: list[int], rows: int) -> Optional[int]:
    return min(sizes, key=lambda n: (abs(n - rows), -n)) if sizes else None


class Switching:
    """The per-step choice between unmerged and merged weights (module docstring), for one scheduler."""

    def __init__(self, mode: str, runner: "DecoderRunner", slots: "LoraSlots", is_current: Callable, rows: int,
                 max_hold: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 timer: Callable[[], float] = time.perf_counter):
        if mode not in POLICIES:
            raise ValueError(f"switching must be one of {', '.join(SWITCHING_MODES)}, got {mode!r}")
        self.mode, self.runner, self.slots, self.is_current = mode, runner, slots, is_current
        self.turns, self.merging = POLICIES[mode]
        self.rows, self.max_hold, self.clock, self.timer = rows, max_hold, clock, timer  # timer: step seconds
        self.target: Optional[Lane] = None  # the lane admitted alone (None: every lane, arrival order)
        self.times = StepTimes()
        self.stats = SwitchingStats()
        self._copy: tuple[Optional[Lane], Optional["Weights"]] = (None, None)
        self._merge_seconds = 0.0           # the last merge's cost
        self._held: dict[str, float] = {}   # request id -> when it was first passed over for a free row
        self._step = 0
        self._last_merged_step = 0
        self._merged_last = False
        self._phase_merged_steps = 0        # merged decode steps of the current phase
        self._merging = False               # whether the current phase runs its lane merged
        self._generating: dict[str, int] = {}  # running request id -> tokens generated so far
        self._request_tokens: Optional[float] = None  # moving average of the tokens a request generates

    # --- the scheduler's calls -----------------------------------------------------------------------
    def plan(self, waiting: Iterable["Sequence"], running: list["Sequence"]) -> None:
        """Choose this step's target lane (before admission)."""
        self._step += 1
        waiting = list(waiting)
        present = {seq.handle.id for seq in waiting}
        self._held = {key: since for key, since in self._held.items() if key in present}
        if self.mode == "off":
            return
        self._count_finished(running)
        lane = self._copy[0]
        if lane and not all(self.is_current(info) for info, _ in lane) \
                and not any(lane_of(seq) == lane for seq in running):
            self._copy = (None, None)  # its adapter was unloaded or replaced and its last sequences have left:
            #                            the copy will not serve again (while they run, it serves them)
        if self.turns == "never":
            return
        if self.target is not None and self._phase_over(waiting, running):
            self.target = None
        if self.target is None:
            self.target = self._next_lane(waiting, running)
            self._phase_merged_steps = 0
            self._merging = self.target is not None and self.merging == "always"
        if self.merging == "measured" and self.target is not None:
            if not self._merging:  # the queue grows, a copy is kept, a measurement arrives: ask again
                self._merging = self._merge_pays(self.target, waiting, running)
            elif self._phase_merged_steps >= MEASURED_STEPS:
                saving = self.times.saving(len(running))
                self._merging = saving is None or saving >= MIN_SAVING  # measured: does merging pay here?

    def admits(self, seq: "Sequence") -> bool:
        """Whether `seq` may take the free row it is offered now: it is on the target lane, or no lane is
        targeted, or it has been held `hold()` seconds already; a sequence passed over starts being held."""
        if self.target is None or lane_of(seq) == self.target:
            return True
        since = self._held.setdefault(seq.handle.id, self.clock())
        return self.clock() - since >= self.hold()

    def weights(self, batch: list["Sequence"], build: bool = True) -> Optional["Weights"]:
        """Merged weights for `batch` when every row is on the lane merging now (the turn's, if it merges;
        with no turns, any lane) and None to run unmerged. Without `build`, only a copy already made is
        used (a prefill does not make its first token wait for a merge)."""
        if self.merging == "never" or not batch:
            return None
        lane = lane_of(batch[0]) if self.turns == "never" else self.target if self._merging else None
        if not lane or any(lane_of(seq) != lane for seq in batch):
            return None
        if self._copy[0] != lane and not build:
            return None
        return self.merged(lane, batch[0].row_pairs)

    def merged(self, lane: Lane, row_pairs) -> "Weights":
        """The weights with `lane` (resident in the slots `row_pairs` name) merged in: the kept copy, or a
        new one built in place of it (its cost measured)."""
        if self._copy[0] != lane:
            self._copy = (None, None)  # free the previous copy before building the next
            start = self.timer()
            adapted = [{group for group, stacks in per_group.items()  # a group no pair adapts has zero scales
                        if any(weight and bool(stacks.scale[slot].any()) for slot, weight in row_pairs)}
                       for per_group in self.slots.stacks]
            deltas = [{group: delta for group, delta in layer.items() if group in groups}
                      for layer, groups in zip(self.slots.delta(row_pairs), adapted)]
            self._copy = (lane, self.runner.merged_weights(deltas))
            self._merge_seconds = self.timer() - start
            self.stats.merges_built += 1
            self.stats.merge_seconds += self._merge_seconds
        return self._copy[1]

    def observe(self, rows: int, merged: bool, seconds: float, decode: bool = True) -> None:
        """A forward pass (decode, or prefill) of `rows` rows took `seconds` on merged (or unmerged) weights."""
        if merged:
            self.stats.merged_seconds += seconds
        if not decode:
            return
        if merged != self._merged_last:  # a switch: decode steps went from one kind of weights to the other
            self.stats.switches += 1
            self._merged_last = merged
            self.stats.merged_lane = lane_name(self._copy[0]) if merged else None
        if merged:
            self._last_merged_step = self._step
            self._phase_merged_steps += 1
        self.times.add(merged, rows, seconds)

    # --- the policy ----------------------------------------------------------------------------------
    def hold(self) -> float:
        """Seconds a request of another lane may be held back: `max_hold`, else HOLD_REQUESTS requests'
        measured decode time (at least MIN_HOLD)."""
        if self.max_hold is not None:
            return self.max_hold
        step = self.times.unmerged(self.rows)
        if step is None or self._request_tokens is None:
            return MIN_HOLD
        return max(MIN_HOLD, HOLD_REQUESTS * self._request_tokens * step)

    def _count_finished(self, running: list["Sequence"]) -> None:
        """Fold the lengths of the requests that left since the last step into the moving average."""
        now = {seq.handle.id: len(seq.output_ids) for seq in running}
        for key, tokens in self._generating.items():
            if key not in now:
                done = tokens + 1  # its last step generated one more
                self._request_tokens = done if self._request_tokens is None else \
                    (1 - SMOOTHING) * self._request_tokens + SMOOTHING * done
        self._generating = now

    def held_longest(self) -> float:
        """Seconds the longest-held waiting request has been held (0 if none is)."""
        return max((self.clock() - since for since in self._held.values()), default=0.0)

    def _phase_over(self, waiting: list["Sequence"], running: list["Sequence"]) -> bool:
        lane = self.target
        if self.held_longest() >= self.hold():
            return True  # a held request's credit is due: the lanes it waits behind yield
        if any(not self.is_current(info) for info, _ in lane):
            return True
        lane_waiting = any(lane_of(seq) == lane for seq in waiting)
        if not lane_waiting and not any(lane_of(seq) == lane for seq in running):
            return True  # the lane has no work left
        others_waiting = any(lane_of(seq) != lane for seq in waiting)
        return not lane_waiting and others_waiting and len(running) < self.rows  # else rows would stay idle

    def _next_lane(self, waiting: list["Sequence"], running: list["Sequence"]) -> Optional[Lane]:
        """The lane of the longest-held request, else of the oldest waiting one. "auto" takes a turn only
        when requests contend for the rows (no one is held while rows are free for all), or when every
        request is on one lane (it merges holding no one back)."""
        everyone = waiting + running
        if not everyone:
            return None
        lanes = {lane_of(seq) for seq in everyone}
        if self.turns == "contended" and len(lanes) > 1 and len(waiting) <= self.rows - len(running):
            return None
        held = [seq for seq in waiting if seq.handle.id in self._held]
        first = min(held, key=lambda seq: self._held[seq.handle.id]) if held else everyone[0]
        return lane_of(first)

    def _merge_pays(self, lane: Lane, waiting: list["Sequence"], running: list["Sequence"]) -> bool:
        """Whether a turn of `lane` should run merged: its measured saving per step, over the steps the turn
        can last, beats twice the cost of merging (a kept copy costs nothing); unmeasured, whether its work
        is long enough to measure it."""
        if not lane:
            return False  # the base has nothing to merge
        mine = [seq for seq in waiting + running if lane_of(seq) == lane]
        pending = sum(seq.max_new_tokens - len(seq.output_ids) for seq in mine)
        rows = min(self.rows, len(mine))
        saving, step = self.times.saving(rows), self.times.unmerged(rows)
        if saving is not None and saving < MIN_SAVING:
            if self._step - self._last_merged_step < PROBE_EVERY:
                return False
            self.times.forget_merged()  # measure again: the batch or the machine may have changed
            saving = None
        if saving is None or step is None:  # never measured both ways: a turn long enough measures it
            return pending / rows >= PROBE_MIN_STEPS
        cost = 0.0 if self._copy[0] == lane else self._merge_seconds
        steps = min(self.hold() / step, pending / rows)
        return saving * step * steps > 2 * cost
