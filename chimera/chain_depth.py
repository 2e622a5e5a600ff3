"""How deep a running batch drafts (batch.py), at each power-of-two batch size and window of slots: the chain depth,
from 0 (a plain step) to the batch's deepest, whose measured tokens per second are highest.

A chain of depth d emits, for each sequence, 1 + min(a, d) tokens, where a counts the drafts of the deepest chain
the base accepted: so the steps at the deepest depth tell what every shallower depth would have yielded, and only
each depth's cost needs steps of its own. The choice explores each depth once per batch size (the deepest first,
two steps each: a first step may carry a capture or a compilation and is not counted), then takes the depth of the
most tokens per second, going back to the deepest now and then to follow the text (what a drafter guesses right
changes with it): after ``EXPLORE_EVERY`` steps, and twice as long after each return that changed nothing, up to
``LONGEST_EXPLORE``. (Every 16 steps, a return to the deepest depth where plain steps are best would cost a GPU
batch of 64 rows about 13 %: a drafted step cost three plain ones there, below.)

A batch shares the yields among its sizes (they depend on the texts, not on how many sequences decode at once) and,
where it captures its steps (a GPU), seeds each size's costs with those steps timed at its warm-up: a size first met
then needs no steps of its own to choose. Since session 20 a choice is kept per size and window (a drafted step's
attention grows with the slots faster than a plain step's); without warm-up timings a size's choice over a new window
starts from what the size measured over another. Exploring every depth at each size had cost `chimera` 12 % and 6 % of
`ar`'s throughput at 16 and 64 clients on an H100 in runs of about a second each (session 18): drafting lost there,
and the batch drafted 7 and 13 % of its steps to find it out.

Why a choice of depths and not only of drafting or not (the lone decoder's switch, adaptive.py): the cost of a
drafted step grows with its depth (a drafting level, and a longer chain to verify for every row) faster than its
yield, and by how much depends on the machine and the batch size. Measured on this project's CPU (an Intel Xeon, 2
threads, float32, the engine's model, 256-slot windows; ``scripts/batch_step_cost.py --draft-depth D``), ms a step
plain / at depth 1 / 2 / 3: 1 row 34-36 / 40 / 46 / 63, 4 rows 53-54 / 72 / 89 / 89, 16 rows 82-84 / 107 / 137 /
164; with tau 1.51 / 1.74 / 1.84 (``scripts/batch_chain_tau.py``) depth 1 yields the most at each size (1.36x,
1.11x and 1.16x plain's tokens per second) and depth 3 gains nothing. On an H100 (uncompiled, random weights,
docs/benchmarks.md session 17) depths 1-3 were within 5 % of each other at 1 and 4 rows, and every depth lost at
16 and 64.

Only what is drafted changes: every depth decodes the same tokens (greedy acceptance), so the choice is free to
follow the clock.
"""

from __future__ import annotations

from .adaptive import MovingAverage

EXPLORE_EVERY = 16  # steps before a first return to the deepest depth, which refreshes every depth's yield
LONGEST_EXPLORE = 256  # the interval doubles after each return that left the choice as it was, up to this
COUNTED_AFTER = 1  # steps of a depth not counted at first (a capture, a compilation)


def yields(deepest: int) -> list[MovingAverage]:
    """Tokens a sequence emits a step, by depth: a plain step one; each drafted depth's from the deepest's steps."""
    return [MovingAverage(1.0, 1)] + [MovingAverage() for _ in range(deepest)]


class ChainDepth:
    """Per batch size: ``next_depth()`` before a step that may draft, ``record(depth, accepted, seconds)`` after it.
    Not ``adaptive``: always the deepest."""

    def __init__(self, deepest: int, adaptive: bool = True, tokens: list[MovingAverage] | None = None,
                 costs: dict[int, float] | None = None):
        self.deepest = deepest
        self.adaptive = adaptive
        self.costs = [MovingAverage() for _ in range(deepest + 1)]  # seconds a step, by depth (0: plain)
        self.steps = [0] * (deepest + 1)  # steps taken at each depth
        # tokens a sequence emits a step, by depth (``yields``), shared where given: what a drafter guesses right
        # depends on the texts, not on how many decode at once
        self.tokens = tokens if tokens is not None else yields(deepest)
        for depth, seconds in (costs or {}).items():  # measured ahead (a batch's warm-up times its captured steps):
            self.costs[depth].add(seconds)  # the depth's steps are then counted from the first
            self.steps[depth] = COUNTED_AFTER
        self.explore_every = EXPLORE_EVERY
        self.since_explored = 0  # choices since the last return to the deepest depth
        self.before_explore: int | None = None  # the depth chosen before a return under way

    def yield_per_second(self, depth: int) -> float | None:
        cost, tokens = self.costs[depth].value, self.tokens[depth].value
        return None if cost is None or tokens is None or cost <= 0 else tokens / cost

    def measured(self) -> dict[int, float]:
        """Seconds a step, by depth, for the depths measured so far: seeds for the choice of another window."""
        return {depth: cost.value for depth, cost in enumerate(self.costs) if cost.value is not None}

    def best(self) -> int:
        return max(range(self.deepest + 1), key=self.yield_per_second)

    def next_depth(self) -> int:
        if not self.adaptive:
            return self.deepest
        for depth in (self.deepest, *range(self.deepest)):  # each measured first, the deepest (every yield) first
            if self.yield_per_second(depth) is None:
                return depth
        self.since_explored += 1
        if self.since_explored >= self.explore_every:
            self.since_explored, self.before_explore = 0, self.best()
            return self.deepest
        return self.best()

    def record(self, depth: int, accepted: list[int], seconds: float) -> None:
        """A step at ``depth`` took ``seconds``; ``accepted``: the drafts accepted in each drafting sequence."""
        self.steps[depth] += 1
        if self.steps[depth] > COUNTED_AFTER:
            self.costs[depth].add(seconds)
        if depth and accepted:
            for shallower in range(1, depth + 1):
                self.tokens[shallower].add(1 + sum(min(a, shallower) for a in accepted) / len(accepted))
        if self.before_explore is not None and depth == self.deepest:  # a return: did it change the choice?
            same = self.best() == self.before_explore
            self.explore_every = min(2 * self.explore_every, LONGEST_EXPLORE) if same else EXPLORE_EVERY
            self.before_explore = None
