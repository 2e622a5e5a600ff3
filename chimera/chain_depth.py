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

Since session 21 the returns to the deepest depth follow one schedule for the whole batch (``Exploration``), as the
yields they refresh are shared: kept per size and window, every choice had returned on its own after 16 of its own
steps, and a batch that met a dozen sizes and windows drafted that many times more to learn the same yields. (On an
H100 `chimera` served 0.92x `ar` at 16 clients drafting 3 % of its steps, most of them returns; session 21.) And a
cost seeded from warm-up is the replay of a captured step alone, without the host's part of a real step (the
members' bookkeeping, the read, the text): until a depth has steps of its own, its seed counts the host's part that
this choice's plain steps measured, so that a drafted depth does not look cheaper than it is beside real plain steps.

Since session 26 a drafted depth's seed counts what real drafted steps of that depth cost above their own seeds at
any size and window of the batch (``SeedExcess``), where such steps were taken: a drafted step's host part is more
than a plain step's (the members' unread tokens read into the drafter first, ``RunningBatch._catch_up``). On an H100
(session 21, 16 clients) drafted steps of depth 2 and 3 took 3.8 and 9.2 ms in real steps where their replays had
taken 2-3, and of its 50 drafted steps in 1,510, 25 were at depths 1 and 2, which a return (always the deepest) never
takes: choices of new sizes and windows that their seeds had sent drafting. Each new choice now starts from what the
others learnt. Measured with it and with prompts read into the drafter at the join (session 26, an H100, 16 clients):
138 steps at depth 2 (2.45 ms against 1.59 for a plain step, at 1.81 tokens a drafted step) and 35 at depth 3 in
1,422, and `chimera` at 0.97x `ar`, against 0.92x; the two changes were not measured apart.

Since session 31 a size met without warm-up timings (a CPU captures nothing) and not yet measured over any window
starts from how the depths' costs compared at the nearest size that measured them (``proportions``), scaled to its
own steps as they come, instead of measuring every depth again, two steps each, the deepest first: at 64 rows on this
project's CPU that exploration took 8 of a run's 57 steps, the depth-3 ones 0.89 s against 0.46-0.51 for a plain step
(session 30), and a batch draining meets every smaller size in turn. A depth this size has taken counts its own
steps; the returns to the deepest depth still measure that one here; a size that borrowed passes on its estimates,
to other sizes and to its own choices over new windows (seeded with what it measured, the other depths proportional).
On this CPU (`chimera throughput`, 66 first turns, 128 new tokens, runs alternated) steps at depths 2 and 3 went from
74 and 38 to 39, 28 and 19 at 16 clients, from 21 to 14 and 6 at 64, while tokens/s stayed within the runs' spread
(`ar` itself moved up to 17 %): `chimera` over `ar` 0.96-1.03x before, 1.06-1.08x after at 16 clients, 1.08-1.11x
before and 1.04-1.07x after at 64 (docs/benchmarks.md, session 31).

Only what is drafted changes: every depth decodes the same tokens (greedy acceptance), so the choice is free to
follow the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .adaptive import MovingAverage

EXPLORE_EVERY = 16  # steps before a first return to the deepest depth, which refreshes every depth's yield
LONGEST_EXPLORE = 256  # the interval doubles after each return that left the choice as it was, up to this
COUNTED_AFTER = 1  # steps of a depth not counted at first (a capture, a compilation)


def yields(deepest: int) -> list[MovingAverage]:
    """Tokens a sequence emits a step, by depth: a plain step one; each drafted depth's from the deepest's steps."""
    return [MovingAverage(1.0, 1)] + [MovingAverage() for _ in range(deepest)]


@dataclass
class Exploration:
    """When the choices of one batch return to the deepest depth, whose steps refresh the yields they share: after
    ``every`` choices of any of them, doubling after each return that changed nothing, up to LONGEST_EXPLORE."""

    every: int = EXPLORE_EVERY
    since: int = 0  # choices since the last return

    def due(self) -> bool:
        """Counts a choice; whether it is a return."""
        self.since += 1
        if self.since < self.every:
            return False
        self.since = 0
        return True

    def returned(self, changed: bool) -> None:
        self.every = EXPLORE_EVERY if changed else min(2 * self.every, LONGEST_EXPLORE)


@dataclass
class SeedExcess:
    """What a batch's real drafted steps cost above their warm-up seeds, by depth (seconds), learnt by any of its
    choices and counted by all: the host's part of a drafted step, which a replay of its capture leaves out."""

    by_depth: dict[int, MovingAverage] = field(default_factory=dict)

    def add(self, depth: int, excess: float) -> None:
        self.by_depth.setdefault(depth, MovingAverage()).add(excess)

    def of(self, depth: int) -> float | None:
        average = self.by_depth.get(depth)
        return None if average is None else average.value


class ChainDepth:
    """Per batch size and window: ``next_depth()`` before a step that may draft, ``record(depth, accepted, seconds)``
    after it. Not ``adaptive``: always the deepest."""

    def __init__(self, deepest: int, adaptive: bool = True, tokens: list[MovingAverage] | None = None,
                 costs: dict[int, float] | None = None, exploration: Exploration | None = None,
                 excess: SeedExcess | None = None, proportions: dict[int, float] | None = None):
        self.deepest = deepest
        self.adaptive = adaptive
        self.costs = [MovingAverage() for _ in range(deepest + 1)]  # seconds a step, by depth (0: plain)
        self.steps = [0] * (deepest + 1)  # steps taken at each depth
        # tokens a sequence emits a step, by depth (``yields``), shared where given: what a drafter guesses right
        # depends on the texts, not on how many decode at once
        self.tokens = tokens if tokens is not None else yields(deepest)
        self.seeds = dict(costs or {})  # measured ahead (a batch's warm-up times its captured steps, no host part)
        for depth, seconds in self.seeds.items():
            self.costs[depth].add(seconds)  # the depth's steps are then counted from the first
            self.steps[depth] = COUNTED_AFTER
        # the returns to the deepest depth: shared where given (a batch's choices), as the yields they refresh are
        self.exploration = exploration if exploration is not None else Exploration()
        # what drafted steps cost above their seeds: shared where given (a batch's choices), as their host part is
        self.excess = excess if excess is not None else SeedExcess()
        self.before_explore: int | None = None  # the depth chosen before a return under way
        # seconds a step by depth that another size or window knew, where nothing was measured ahead for this one (a
        # CPU): how the depths' costs compare, for the depths with no cost here, scaled to this one's own (``cost``)
        self.proportions = {depth: seconds for depth, seconds in (proportions or {}).items() if seconds > 0}

    def cost(self, depth: int) -> float | None:
        """Seconds a step at ``depth``: measured, or, where a drafted depth has no step of its own yet, seeded plus
        what the batch's drafted steps of that depth cost above their seeds (``SeedExcess``) or, until there are
        any, the host's part that this choice's plain steps measured over their own seed; where it has neither,
        proportional (``_proportional``)."""
        cost = self.costs[depth].value
        if cost is None:
            return self._proportional(depth)
        seed_alone = depth > 0 and depth in self.seeds and self.steps[depth] <= COUNTED_AFTER
        if not seed_alone:
            return cost
        learnt = self.excess.of(depth)
        if learnt is not None:
            return cost + max(learnt, 0.0)
        if 0 not in self.seeds or self.steps[0] <= COUNTED_AFTER:
            return cost
        return cost + max(self.costs[0].value - self.seeds[0], 0.0)

    def _proportional(self, depth: int) -> float | None:
        """A depth with no step of its own here: its cost at the size ``proportions`` come from, times what this size's
        most counted depth costs here over what it cost there (before any, as there: only the ratios choose)."""
        if depth not in self.proportions:
            return None
        own = [d for d in self.proportions if self.costs[d].value is not None]
        if not own:
            return self.proportions[depth]
        reference = max(own, key=lambda d: self.costs[d].count)
        return self.proportions[depth] * self.costs[reference].value / self.proportions[reference]

    def yield_per_second(self, depth: int) -> float | None:
        cost, tokens = self.cost(depth), self.tokens[depth].value
        return None if cost is None or tokens is None or cost <= 0 else tokens / cost

    def measured(self) -> dict[int, float]:
        """Seconds a step, by depth, for the depths measured so far: seeds for the choice of another window."""
        return {depth: cost.value for depth, cost in enumerate(self.costs) if cost.value is not None}

    def estimated(self) -> dict[int, float]:
        """Seconds a step, by depth, for the depths with a cost, measured or proportional: another size's
        proportions (a size that borrowed its own passes them on, scaled to its steps)."""
        return {depth: seconds for depth in range(self.deepest + 1) if (seconds := self.cost(depth)) is not None}

    def best(self) -> int:
        return max(range(self.deepest + 1), key=self.yield_per_second)

    def next_depth(self) -> int:
        if not self.adaptive:
            return self.deepest
        for depth in (self.deepest, *range(self.deepest)):  # each measured first, the deepest (every yield) first
            if self.yield_per_second(depth) is None:
                return depth
        if self.exploration.due():
            self.before_explore = self.best()
            return self.deepest
        return self.best()

    def record(self, depth: int, accepted: list[int], seconds: float) -> None:
        """A step at ``depth`` took ``seconds``; ``accepted``: the drafts accepted in each drafting sequence."""
        self.steps[depth] += 1
        if self.steps[depth] > COUNTED_AFTER:
            self.costs[depth].add(seconds)
            if depth and depth in self.seeds:
                self.excess.add(depth, seconds - self.seeds[depth])
        if depth and accepted:
            for shallower in range(1, depth + 1):
                self.tokens[shallower].add(1 + sum(min(a, shallower) for a in accepted) / len(accepted))
        if self.before_explore is not None and depth == self.deepest:  # a return: did it change the choice?
            self.exploration.returned(self.best() != self.before_explore)
            self.before_explore = None
