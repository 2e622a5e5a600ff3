"""Adaptive drafting: the switch's rule on synthetic costs, and the loop's output unchanged when it pauses."""

import pytest
import torch

from chimera import SpeculativeDecoder
from chimera.adaptive import (FIRST_PAUSE, LONGEST_PAUSE, OUTLIER_RUN, PROBE_STEPS, TRIAL_STEPS, DraftingSwitch,
                              PauseMemory, StepCosts)
from chimera.verifier import SlotVerifier
from conftest import FAMILIES, as_on_a_gpu, tiny_model
from test_drafter import perturbed_drafter


def run(switch: DraftingSwitch, emitted: int, steps: int, plain_seconds=1.0, speculative_seconds=2.0) -> str:
    """Drive the switch for ``steps`` steps; 'D' for a drafted step, '.' for a plain one."""
    trace = ""
    for _ in range(steps):
        drafted = switch.draft_next()
        trace += "D" if drafted else "."
        switch.record(drafted, emitted if drafted else 1, speculative_seconds if drafted else plain_seconds)
    return trace


def test_break_even_is_the_cost_ratio_once_both_are_measured():
    costs = StepCosts()
    assert costs.break_even is None
    costs.record(True, 30.0)  # the first step of each kind carries one-time costs: not counted
    costs.record(True, 3.0)
    assert costs.break_even is None
    costs.record(False, 50.0)
    costs.record(False, 1.5)
    assert costs.break_even == pytest.approx(2.0)
    costs.record(False, 100.0)  # a graph capture in mid-run: an outlier, left out
    assert costs.break_even == pytest.approx(2.0)
    for _ in range(OUTLIER_RUN):  # but a slower machine is a new regime
        costs.record(False, 100.0)
    assert costs.plain.value > 1.5


def test_a_drafter_that_pays_is_never_paused():
    switch = DraftingSwitch(StepCosts.of(1.0, 2.0))
    assert run(switch, emitted=3, steps=50) == "D" * 50
    assert switch.paused_steps == 0


def test_a_drafter_that_misses_pauses_for_longer_each_time():
    switch = DraftingSwitch(StepCosts.of(1.0, 2.0))
    trace = run(switch, emitted=1, steps=300)
    pauses = [len(p) for p in trace.split("D") if p]
    trials = [len(t) for t in trace.split(".") if t]
    assert pauses[:5] == [FIRST_PAUSE, 2 * FIRST_PAUSE, 4 * FIRST_PAUSE, 8 * FIRST_PAUSE, LONGEST_PAUSE]
    assert max(pauses) == LONGEST_PAUSE
    assert all(t == TRIAL_STEPS for t in trials[:-1])
    assert switch.paused_steps == trace.count(".")


def test_a_trial_that_pays_resets_the_pause():
    switch = DraftingSwitch(StepCosts.of(1.0, 2.0))
    run(switch, emitted=1, steps=2 * TRIAL_STEPS + FIRST_PAUSE + 2 * FIRST_PAUSE)  # two failed trials, two pauses
    assert switch.next_pause == 4 * FIRST_PAUSE
    run(switch, emitted=4, steps=TRIAL_STEPS)  # then a good stretch
    assert switch.next_pause == FIRST_PAUSE


def test_a_generation_after_a_failed_trial_starts_paused():
    """The decoder's memory carries the last judged trial into its next generation: after failures the next one
    starts with half the pause reached, and goes on doubling from there; a drafter that pays clears it."""
    costs, memory = StepCosts.of(1.0, 2.0), PauseMemory()
    first = run(DraftingSwitch(costs, memory=memory), emitted=1, steps=100)
    assert memory.failed and memory.next_pause == LONGEST_PAUSE
    second = DraftingSwitch(costs, memory=memory)
    trace = run(second, emitted=1, steps=100)
    assert trace.startswith("." * (LONGEST_PAUSE // 2) + "D" * TRIAL_STEPS + "." * LONGEST_PAUSE)
    assert trace.count("D") < first.count("D") / 2  # the ever-longer pauses were not paid again
    assert second.paused_steps == trace.count(".")
    third = DraftingSwitch(costs, memory=memory)
    trace = run(third, emitted=4, steps=100)  # a text the drafter suits: one pause, then drafting throughout
    assert trace == "." * (LONGEST_PAUSE // 2) + "D" * (100 - LONGEST_PAUSE // 2)
    assert not memory.failed and memory.next_pause == FIRST_PAUSE
    assert run(DraftingSwitch(costs, memory=memory), emitted=4, steps=20) == "D" * 20


def test_without_adaptation_memory_is_ignored():
    memory = PauseMemory(failed=True, next_pause=LONGEST_PAUSE)
    assert run(DraftingSwitch(StepCosts.of(1.0, 2.0), adaptive=False, memory=memory), emitted=1, steps=10) == "D" * 10


def test_unmeasured_plain_steps_are_probed_before_judging():
    switch = DraftingSwitch(StepCosts())
    trace = run(switch, emitted=3, steps=30)
    assert trace[:TRIAL_STEPS + PROBE_STEPS] == "D" * TRIAL_STEPS + "." * PROBE_STEPS
    assert trace[TRIAL_STEPS + PROBE_STEPS:] == "D" * (30 - TRIAL_STEPS - PROBE_STEPS)


def test_without_adaptation_it_always_drafts():
    switch = DraftingSwitch(StepCosts.of(1.0, 100.0), adaptive=False)
    assert run(switch, emitted=1, steps=40) == "D" * 40


@pytest.mark.parametrize("family", FAMILIES)
def test_pausing_never_changes_the_output(family, default_model):
    """Costs that make every trial fail (plain steps nearly free) force pauses mid-sequence; the drafter then
    catches up on the tokens verified without it. The output is generate's, token for token."""
    _, tokenizer = default_model
    model = tiny_model(family)
    drafter = perturbed_drafter(model, heads=5)
    gen = torch.Generator().manual_seed(3)
    paused_steps = 0
    for tree in ("small", "chain4"):
        paused = SpeculativeDecoder(model, tokenizer, drafter, tree=tree)
        slotted = SpeculativeDecoder(model, tokenizer, drafter, tree=tree)  # pauses queue plain steps ahead there
        slotted.verifier = SlotVerifier(model, graphs=False)
        queued = as_on_a_gpu(SpeculativeDecoder(model, tokenizer, drafter, tree=tree))  # speculative steps too
        steady = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False)
        for n in (4, 11):
            ids = torch.randint(3, 128, (n,), generator=gen).tolist()
            paused.costs = StepCosts.of(1e-9, 1.0)
            slotted.costs = StepCosts.of(1e-9, 1.0)
            queued.costs = StepCosts.of(1e-9, 1.0)
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40,
                                 eos_token_id=sorted(steady.eos_ids))
            a = paused.generate(input_ids=ids, max_new_tokens=40)
            b = steady.generate(input_ids=ids, max_new_tokens=40)
            c = slotted.generate(input_ids=ids, max_new_tokens=40)
            d = queued.generate(input_ids=ids, max_new_tokens=40)
            assert a.token_ids == b.token_ids == c.token_ids == d.token_ids and c.plain_steps == a.plain_steps
            assert d.plain_steps > 0 or d.steps <= TRIAL_STEPS + 2  # + 1: a failed trial is seen a step late
            assert b.token_ids == ref[0, len(ids):].tolist()
            assert b.plain_steps == 0 and (a.plain_steps > 0 or a.steps <= TRIAL_STEPS + 1)  # + 1: the prefill
            assert sum(a.accepted) == a.new_tokens and len(a.accepted) == a.steps
            paused_steps += a.plain_steps
    assert paused_steps > 0


def test_seeded_sampling_keeps_drafting_and_reproduces(default_model):
    _, tokenizer = default_model
    model = tiny_model("llama")
    decoder = SpeculativeDecoder(model, tokenizer, perturbed_drafter(model, heads=5), tree="small")
    runs = []
    for _ in range(2):
        decoder.costs = StepCosts.of(1e-9, 1.0)  # would pause at once if it adapted
        runs.append(decoder.generate(input_ids=[5, 6, 7], max_new_tokens=30, temperature=1.0, seed=7))
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].plain_steps == runs[1].plain_steps == 0


def test_an_untimed_step_counts_in_its_trial_but_not_in_the_costs():
    """A turn of the loop that launched a step of the other kind is not timed (generate.py): its step still
    counts in the trial, and the measured costs keep their values."""
    costs = StepCosts.of(1.0, 2.0)
    switch = DraftingSwitch(costs)
    switch.record(True, 3, None)
    switch.record(False, 1, None)
    assert costs.speculative.value == 2.0 and costs.plain.value == 1.0
    assert switch.trial_steps == 1
    switch.record(True, 3, 3.0)  # a timed one moves them
    assert costs.speculative.value == 2.5
