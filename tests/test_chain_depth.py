"""How deep a running batch drafts (chimera/chain_depth.py): every depth measured before one is chosen, the yield of
shallower depths read from the deepest's steps, the depth of the most tokens per second taken, and a running batch
whose depths change from step to step still decodes every sequence as alone."""

import pytest

from chimera.batch import DRAFT_DEPTH, RunningBatch
from chimera.adaptive import MovingAverage
from chimera.chain_depth import (COUNTED_AFTER, EXPLORE_EVERY, LONGEST_EXPLORE, ChainDepth, Exploration, SeedExcess,
                                 yields)
from conftest import tiny_model
from test_batch import drain, with_references
from test_drafter import perturbed_drafter


def run(choice: ChainDepth, costs: dict[int, float], accepted: list[int], steps: int) -> list[int]:
    """``steps`` steps at the depths ``choice`` picks, each costing ``costs[depth]`` seconds, the deepest chains'
    drafts accepted as ``accepted`` says (shallower ones cut to their depth)."""
    depths = []
    for _ in range(steps):
        depth = choice.next_depth()
        choice.record(depth, [min(a, depth) for a in accepted] if depth else [], costs[depth])
        depths.append(depth)
    return depths


def test_every_depth_is_measured_the_deepest_first_and_shallower_yields_come_from_it():
    choice = ChainDepth(3)
    depths = run(choice, {0: 1.0, 1: 1.2, 2: 1.4, 3: 1.6}, accepted=[3, 0], steps=2 * (COUNTED_AFTER + 1) * 4)
    first = depths[:COUNTED_AFTER + 1]
    assert first == [3] * (COUNTED_AFTER + 1)  # the deepest first, its yield tells every depth's
    assert [choice.tokens[d].value for d in range(4)] == [1.0, 1.5, 2.0, 2.5]  # 1 + mean of min(a, d) over [3, 0]
    assert all(choice.costs[d].value is not None for d in range(4))


@pytest.mark.parametrize("costs, best", [({0: 1.0, 1: 1.2, 2: 1.4, 3: 1.6}, 3),  # 2.5 / 1.6 beats 1 / 1.0
                                         ({0: 1.0, 1: 1.1, 2: 2.5, 3: 3.0}, 1),  # 1.5 / 1.1 beats the rest
                                         ({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, 0)])  # drafting never pays
def test_the_depth_of_the_most_tokens_per_second_is_taken(costs, best):
    choice = ChainDepth(3)
    depths = run(choice, costs, accepted=[3, 0], steps=5 * EXPLORE_EVERY)
    settled = depths[2 * EXPLORE_EVERY:]
    assert settled.count(best) >= len(settled) - len(settled) // EXPLORE_EVERY - 1  # but the deepest, now and then
    assert set(settled) <= {best, 3}


@pytest.mark.parametrize("costs, best", [({0: 1.0, 1: 1.2, 2: 1.4, 3: 1.6}, 3), ({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, 0)])
def test_a_size_with_costs_measured_ahead_and_shared_yields_chooses_at_its_first_step(costs, best):
    """The yields another size's deepest steps taught, and this size's costs seeded (a batch's warm-up): no step
    explores; the seeded costs then follow the steps taken."""
    shared = yields(3)
    run(ChainDepth(3, tokens=shared), costs, accepted=[3, 0], steps=2 * (COUNTED_AFTER + 1) * 4)
    assert shared[3].value == 2.5
    choice = ChainDepth(3, tokens=shared, costs=costs)
    depths = run(choice, costs, accepted=[3, 0], steps=EXPLORE_EVERY - 1)
    assert set(depths) == {best}
    assert choice.steps[best] == COUNTED_AFTER + EXPLORE_EVERY - 1 and choice.costs[best].count == EXPLORE_EVERY
    unseeded = run(ChainDepth(3), costs, accepted=[3, 0], steps=EXPLORE_EVERY - 1)
    assert unseeded[:2] == [3, 3] and len(set(unseeded)) == 4  # without them: every depth measured first


def test_returns_to_the_deepest_depth_grow_rarer_while_they_change_nothing():
    choice = ChainDepth(3)
    depths = run(choice, {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, accepted=[1], steps=2000)
    settled = depths[8:]  # after each depth's two measured steps
    returns = [i for i, depth in enumerate(settled) if depth == 3]
    gaps = [b - a for a, b in zip(returns, returns[1:])]
    assert gaps[:4] == [2 * EXPLORE_EVERY, 4 * EXPLORE_EVERY, 8 * EXPLORE_EVERY, LONGEST_EXPLORE]
    assert set(gaps[3:]) == {LONGEST_EXPLORE} and set(settled) == {0, 3}
    # the text turns predictable: the next return finds the deepest chain best and returns come often again
    for _ in range(LONGEST_EXPLORE):
        choice.record(3, [3], 4.0)  # as steps drafted elsewhere would teach it
    choice.exploration.since = choice.exploration.every - 1
    assert choice.next_depth() == 3
    choice.record(3, [3], 1.5)
    assert choice.best() == 3 and choice.exploration.every == EXPLORE_EVERY


def test_the_choices_of_a_batch_return_to_the_deepest_depth_on_one_schedule():
    """A batch's choices (one per size and window) share the yields that a return to the deepest depth refreshes, and
    so the returns' schedule: however many choices the steps go through, they return as one choice alone would."""
    costs = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}  # drafting never pays: every depth but plain is a return

    def returns(choices: list[ChainDepth], steps: int) -> list[int]:
        depths = [run(choices[i % len(choices)], costs, accepted=[1], steps=1)[0] for i in range(steps)]
        return [i for i, depth in enumerate(depths) if depth == 3]

    tokens, exploration = yields(3), Exploration()
    run(ChainDepth(3, tokens=tokens), costs, accepted=[1], steps=8)  # the yields learnt
    shared = [ChainDepth(3, tokens=tokens, costs=costs, exploration=exploration) for _ in range(8)]
    alone = [ChainDepth(3, tokens=yields(3), costs=costs)]
    alone[0].tokens[1:] = [MovingAverage(value, 1) for value in (1.5, 1.5, 1.5)]
    steps = 16 * EXPLORE_EVERY
    assert returns(shared, steps) == returns(alone, steps) == [EXPLORE_EVERY - 1, 3 * EXPLORE_EVERY - 1,
                                                               7 * EXPLORE_EVERY - 1, 15 * EXPLORE_EVERY - 1]
    apart = [ChainDepth(3, tokens=tokens, costs=costs) for _ in range(8)]  # each on its own schedule, as until
    assert len(returns(apart, steps)) > 4 * len(returns(alone, steps))  # session 21


def test_a_seeded_depth_counts_the_host_part_that_plain_steps_measured():
    """Warm-up seeds a step's cost with the replay of its capture alone; real steps add the host's part. Until a
    drafted depth has steps of its own, its seed is compared with real plain steps plus that part, not without it:
    here drafting looks faster on the seeds (1.4 tokens for 1.5 s against 1 for 1.0) and is, by the seeds alone, set
    beside plain steps that really take 1.2 s; with the host's 0.2 s it is not (1.4 / 1.7 < 1 / 1.2)."""
    tokens = yields(1)
    tokens[1] = MovingAverage(1.4, 1)
    choice = ChainDepth(1, tokens=tokens, costs={0: 1.0, 1: 1.5})
    depths = run(choice, {0: 1.2, 1: 1.7}, accepted=[1, 1, 0, 0, 0], steps=EXPLORE_EVERY - 1)
    assert depths == [0] * (EXPLORE_EVERY - 1)
    assert choice.cost(1) == pytest.approx(1.5 + choice.costs[0].value - 1.0)
    assert choice.next_depth() == 1  # a return: from its own steps on, its cost is what they measure
    choice.record(1, [1, 1, 0, 0, 0], 1.7)
    assert choice.cost(1) == choice.costs[1].value == pytest.approx(1.6)


def test_what_drafted_steps_cost_above_their_seeds_is_learnt_once_for_every_choice_of_a_batch():
    """Seeds say drafting pays (1.4 tokens for 1.1 s against 1 for 1.0); real drafted steps cost 2.0 (a drafted
    step's host part, more than a plain step's). The first choice drafts until its own steps say otherwise; a choice
    of another size or window, seeded alike, then counts what they cost above their seed and never drafts, where
    one that learnt nothing from it drafts as the first did."""
    tokens, excess = yields(1), SeedExcess()
    tokens[1] = MovingAverage(1.4, 1)
    seeds, real = {0: 1.0, 1: 1.1}, {0: 1.0, 1: 2.0}

    def choice(shared: SeedExcess) -> ChainDepth:
        return ChainDepth(1, tokens=tokens, costs=seeds, excess=shared, exploration=Exploration(every=10 ** 6))

    first = run(choice(excess), real, accepted=[1, 1, 0, 0, 0], steps=EXPLORE_EVERY)
    assert first[0] == 1 and first[-1] == 0
    assert excess.of(1) == pytest.approx(2.0 - 1.1)
    assert run(choice(excess), real, accepted=[1, 1, 0, 0, 0], steps=EXPLORE_EVERY) == [0] * EXPLORE_EVERY
    assert run(choice(SeedExcess()), real, accepted=[1, 1, 0, 0, 0], steps=EXPLORE_EVERY)[0] == 1


def test_a_size_without_costs_of_its_own_compares_its_depths_as_another_size_did():
    """No seeds (a CPU times nothing at warm-up), but another size's measured costs: the depths compare as they did
    there, so the first step chooses without exploring; a depth not yet taken here costs what it cost there, scaled by
    what this size's own steps of another depth cost against that size's."""
    shared = yields(3)
    run(ChainDepth(3, tokens=shared), {0: 1.0, 1: 1.2, 2: 1.4, 3: 1.6}, accepted=[3, 0], steps=8)
    there = {0: 1.0, 1: 1.1, 2: 2.5, 3: 3.0}  # 1.5 tokens for 1.1 s is best
    choice = ChainDepth(3, tokens=shared, proportions=there)
    assert choice.next_depth() == 1 and choice.measured() == {}
    depths = run(choice, {0: 0.5, 1: 0.55, 2: 1.25, 3: 1.5}, accepted=[3, 0], steps=EXPLORE_EVERY - 2)
    assert set(depths) == {1}
    assert choice.measured() == {1: pytest.approx(0.55)}
    assert [choice.cost(d) for d in range(4)] == pytest.approx([0.5, 0.55, 1.25, 1.5])
    # where this size's own steps of a depth disagree with the proportions, they count for that depth
    choice.record(3, [3, 0], 0.6)
    choice.record(3, [3, 0], 0.6)
    assert choice.cost(3) == pytest.approx(0.6) and choice.best() == 3
    assert ChainDepth(3, tokens=shared, proportions={3: 3.0}).next_depth() == 0  # the others explored first


def test_without_adaptation_the_deepest_always():
    choice = ChainDepth(2, adaptive=False)
    assert run(choice, {0: 1.0, 1: 9.0, 2: 9.0}, accepted=[0], steps=20) == [2] * 20


@pytest.mark.parametrize("drafter", ["oracle", "random"])
def test_a_batch_whose_depth_changes_step_by_step_decodes_as_alone(drafter, default_model):
    """Adaptive depths: the exploration alone takes every depth, plain steps included; each sequence is what it is
    alone."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    prompts, budgets, expected, oracle = with_references(model, tokenizer, 12, {6: 30, 19: 24, 11: 28})
    chosen = oracle if drafter == "oracle" else perturbed_drafter(model, heads=DRAFT_DEPTH)
    batch = RunningBatch(model, tokenizer, max_batch=3, capacity=128, drafter=chosen, adaptive=True)
    sequences, texts = {}, {}
    for name in prompts:
        sequences[name], texts[name] = batch.add(prompts[name], budgets[name])
    results = drain(batch, sequences, texts)
    assert set(batch.counts.by_depth) == set(range(DRAFT_DEPTH + 1))
    for name in prompts:
        assert results[name].token_ids == expected[name].token_ids, name
        assert results[name].text == texts[name] == expected[name].text


def test_a_size_met_over_a_new_window_starts_from_what_it_measured_over_another(default_model):
    """The choice is kept per batch size and window (a drafted step's attention grows with the slots faster than a
    plain step's). Without warm-up timings (no captures: a CPU), a size's choice over a new window is seeded with
    what the same size measured over another, and chooses at once; another size explores on its own."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=DRAFT_DEPTH)
    batch = RunningBatch(model, tokenizer, max_batch=4, capacity=256, drafter=drafter, adaptive=True)
    costs = {0: 1.0, 1: 1.2, 2: 1.3, 3: 1.4}
    narrow = batch._depth_choice(2, 64)
    run(narrow, costs, [1, 1], 2 * (DRAFT_DEPTH + 1))  # every depth measured twice
    assert narrow.measured() == costs
    wide = batch._depth_choice(2, 128)
    assert wide is not narrow and wide.measured() == costs
    assert wide.excess is not batch.seed_excess  # its seeds are real steps: they hold their host part already
    assert wide.next_depth() == 1  # 2 tokens for 1.2 s: no depth explored first
    assert batch._depth_choice(2, 64) is narrow


def test_a_new_size_starts_from_how_the_depths_compared_at_the_nearest_size_measured(default_model):
    """Without warm-up timings, a size met for the first time compares its depths as the nearest size that measured
    them did (the larger of two as near), and chooses at once; its own costs start empty."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    batch = RunningBatch(model, tokenizer, max_batch=16, capacity=128, drafter=perturbed_drafter(model, heads=3),
                         draft_depth=3, adaptive=True)
    pairs = {1: {0: 1.0, 1: 1.2, 2: 1.3, 3: 1.4}, 4: {0: 1.0, 1: 3.0, 2: 3.0, 3: 3.0},
             16: {0: 1.0, 1: 1.1, 2: 5.0, 3: 5.0}}
    run(ChainDepth(3, tokens=batch.yields), pairs[1], [1, 1], 2 * 4)  # the yields learnt: 2 tokens a drafted step
    for size, costs in pairs.items():
        batch.depths[size, 64] = ChainDepth(3, tokens=batch.yields, costs=costs)  # as if measured
    assert batch._depth_choice(2, 64).proportions == pairs[4]  # 1 and 4 are as near: the larger
    assert batch._depth_choice(2, 64).measured() == {} and batch._depth_choice(2, 64).next_depth() == 0
    assert batch._depth_choice(8, 128).proportions == pairs[16]
    assert batch._depth_choice(8, 128).next_depth() == 1
    # the same size over another window: its own seeds, and its own proportions for depths it did not measure
    assert batch._depth_choice(16, 128).proportions == pairs[16]
    assert batch._depth_choice(16, 128).measured() == pairs[16]


def test_a_size_that_borrowed_proportions_passes_them_on_scaled_to_its_own_steps(default_model):
    """Size 2 measured every depth; size 4 borrowed its proportions and took depth 1 only, at twice size 2's cost; size
    8, nearest to 4, gets 4's estimates for every depth and explores none."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    batch = RunningBatch(model, tokenizer, max_batch=8, capacity=128, drafter=perturbed_drafter(model, heads=3),
                         draft_depth=3, adaptive=True)
    costs = {0: 1.0, 1: 1.1, 2: 2.5, 3: 3.0}
    run(batch._depth_choice(2, 64), costs, [1, 1], 2 * 4)  # explored: every depth measured
    four = batch._depth_choice(4, 64)
    run(four, {depth: 2 * seconds for depth, seconds in costs.items()}, [1, 1], 4)
    assert four.measured() == {1: pytest.approx(2.2)}
    eight = batch._depth_choice(8, 64)
    assert eight.proportions == pytest.approx({depth: 2 * seconds for depth, seconds in costs.items()})
    assert eight.next_depth() == 1
    # size 4 over a new window: its one measured depth seeded, the others from its own estimates, none explored
    wide = batch._depth_choice(4, 128)
    assert wide.measured() == {1: pytest.approx(2.2)}
    assert [wide.cost(depth) for depth in range(4)] == pytest.approx([2 * costs[d] for d in range(4)])
    assert wide.next_depth() == 1
