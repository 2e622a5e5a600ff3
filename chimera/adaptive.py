"""Whether to draft at the next step: speculation pays only while the drafter's accepted tokens outrun its cost.

A speculative step costs r plain steps (drafting, then verifying a tree) and emits tau tokens, so it pays
exactly when tau > r, the break-even. r depends on the machine (measured: 1.3-1.6 on this project's 2-core
CPUs, where a drafting level is a sizeable part of a small model's step) and tau on the text: the shipped
drafter reaches 2-4 on chat answers and about 1.3 on some prompts, where drafting made the demo slower than
plain decoding (11.4 against 14.5 tokens/s). The loop therefore measures both step costs as it runs
(``StepCosts``, kept by the decoder across generations) and lets a ``DraftingSwitch`` decide each step:

- while drafting, it follows the accepted tokens per step (an exponential moving average); after a short
  trial, if they fall below the measured break-even, it stops drafting for a pause of plain steps;
- each pause is followed by a new trial; a failed trial doubles the next pause (up to a bound), a trial
  that pays resets it, so a drafter that keeps missing costs a few trial steps per pause and no more;
- the decoder remembers its last judged trial (``PauseMemory``): a generation that follows a failed one starts
  paused, for half the pause it had reached, instead of trying again from the shortest pause. Without that,
  every request began with the run of ever longer pauses (4, 8, 16, 32 plain steps, each after a 4-step trial),
  which on an H200, where a drafted step of the default model costs about four plain ones, is most of a
  256-token answer (session 11's bench: `chimera` at 0.81x of `ar` with adaptive drafting on).

Where the loop launches a step before it reads the one before (steps.py), a turn of the loop spends the host's
time launching the next step and the device's running this one, so its time is this step's cost only when the
next step is of the same kind; a turn whose next step is of the other kind is not timed. (On an H200 with every
turn timed, drafting ran through 93 % of the steps launched ahead and 28 % of the steps read one by one, on the same
prompts: we read this as the plain steps before a drafted one being charged for launching it, which made plain
steps look dearer than they are.)

What is drafted never changes what is output: a plain step is the same verification with a tree of one node
(greedy: the base's argmax; sampling: a draw from the base's distribution). Only the speed changes. A seeded
sampled run must draw the same tokens every time, so it keeps drafting throughout (its random draws depend on
the trees, and timing-driven trees would make it irreproducible); greedy and unseeded runs adapt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMOOTHING = 0.125  # weight of the newest step in the moving averages, once they hold 8 steps
TRIAL_STEPS = 4  # speculative steps before a trial is judged
FIRST_PAUSE = 4  # plain steps after the first failed trial
LONGEST_PAUSE = 64  # the pause doubles after each failed trial up to this
OUTLIER = 4.0  # a step this many times its kind's average cost carried a one-time cost (a graph capture)
OUTLIER_RUN = 3  # outliers in a row after which they are counted after all
PROBE_STEPS = 2  # plain steps taken to measure their cost when none is known: the first is not counted


@dataclass
class MovingAverage:
    """The plain mean of the first 1/SMOOTHING values, then an exponential moving average (no start-up bias)."""

    value: float | None = None
    count: int = 0

    def add(self, new: float) -> None:
        self.count += 1
        weight = max(SMOOTHING, 1 / self.count)
        self.value = new if self.value is None else self.value + weight * (new - self.value)


@dataclass
class StepCosts:
    """Seconds of a plain step and of a speculative step on one decoder (moving averages, so they follow the
    context's growth), kept across its generations: the machine's costs do not change with the prompt.

    A step that costs more than OUTLIER times its kind's average is left out: it carried a one-time cost (on a
    GPU the first step of a shape captures its CUDA graph, 10-100x a replay), not the step's own; several in a
    row are a new regime (the machine got busier) and are counted. For the same reason the first step of each
    kind is never counted."""

    plain: MovingAverage = field(default_factory=MovingAverage)
    speculative: MovingAverage = field(default_factory=MovingAverage)
    seen: set = field(default_factory=set)  # the kinds whose first step has gone by
    outliers: int = 0  # consecutive steps left out

    @classmethod
    def of(cls, plain: float, speculative: float) -> "StepCosts":
        return cls(MovingAverage(plain, 1), MovingAverage(speculative, 1), {True, False})

    def record(self, drafted: bool, seconds: float) -> None:
        average = self.speculative if drafted else self.plain
        if drafted not in self.seen:
            self.seen.add(drafted)
        elif average.value is not None and seconds > OUTLIER * average.value and self.outliers < OUTLIER_RUN:
            self.outliers += 1
        else:
            self.outliers = 0
            average.add(seconds)

    @property
    def break_even(self) -> float | None:
        """The tokens a speculative step must emit to be as fast as plain steps (r), once both are measured."""
        plain, speculative = self.plain.value, self.speculative.value
        if plain is None or speculative is None or plain <= 0:
            return None
        return speculative / plain


@dataclass
class PauseMemory:
    """A decoder's last judged trial, carried from one generation to the next: whether it failed, and the pause
    the next failure would take."""

    failed: bool = False
    next_pause: int = FIRST_PAUSE


class DraftingSwitch:
    """Per generation: ``draft_next()`` before a step, ``record(drafted, emitted, seconds)`` after it. ``memory``:
    the decoder's ``PauseMemory``, read at the start (after a failed trial the generation starts paused, for half
    the pause reached: a new text may suit the drafter better) and kept up to date."""

    def __init__(self, costs: StepCosts, adaptive: bool = True, memory: PauseMemory | None = None):
        self.costs = costs
        self.adaptive = adaptive
        self.memory = memory if memory is not None else PauseMemory()  # also holds the pause of the next failure
        # plain steps still to run before the next trial
        self.pause_left = self.memory.next_pause // 2 if adaptive and self.memory.failed else 0
        self.trial_steps = 0
        self.emitted = MovingAverage()  # tokens per speculative step since this trial began
        self.paused_steps = 0  # plain steps taken by choice, for the statistics

    @property
    def next_pause(self) -> int:
        """The pause the next failed trial takes (kept in the memory, which later generations read)."""
        return self.memory.next_pause

    def draft_next(self) -> bool:
        return not self.adaptive or self.pause_left == 0

    def draft_after(self, drafting: bool) -> bool:
        """During a step, before its ``record``: whether to draft at the step after it (which the loop queues before
        reading this one, generate.py). After a plain step that is exact, whatever it emits; after a speculative one
        it is ``draft_next()`` now: a trial failed by this step is seen one step late, and ``record`` leaves that
        extra step out of the next trial."""
        if not self.adaptive:
            return True
        return self.pause_left == 0 if drafting else self.pause_left <= 1

    def record(self, drafted: bool, emitted: int, seconds: float | None) -> None:
        """``seconds``: the step's cost, or None where the loop could not time it alone (below)."""
        if seconds is not None:
            self.costs.record(drafted, seconds)
        if not self.adaptive:
            return
        if not drafted:
            if self.pause_left:
                self.pause_left -= 1
                self.paused_steps += 1
            return
        if self.pause_left:  # queued before the pause began (draft_after): it belongs to no trial
            return
        self.emitted.add(emitted)
        self.trial_steps += 1
        if self.trial_steps < TRIAL_STEPS:
            return
        break_even = self.costs.break_even
        if break_even is None:  # no plain step measured yet: take some, then judge
            self._pause(PROBE_STEPS)
        elif self.emitted.value < break_even:
            self._pause(self.next_pause)
            self.memory.failed, self.memory.next_pause = True, min(2 * self.next_pause, LONGEST_PAUSE)
        elif self.trial_steps == TRIAL_STEPS:  # this trial paid: a later lapse starts over with a short pause
            self.memory.failed, self.memory.next_pause = False, FIRST_PAUSE

    def _pause(self, steps: int) -> None:
        self.pause_left = steps
        self.trial_steps = 0
        self.emitted = MovingAverage()
