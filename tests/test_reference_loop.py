"""Our autoregressive loop equals transformers' greedy generate, and stops where it should."""

import pytest
import torch

from chimera import SpeculativeDecoder
from chimera.device_read import StepRead
from chimera.text import StopCondition
from chimera.verifier import SlotSession, SlotVerifier
from chimera.tree import DynamicTree
from conftest import CHAT_PROMPTS, FAMILIES, as_on_a_gpu, tiny_model

PROMPTS = CHAT_PROMPTS[:5]


def hf_greedy(model, ids, max_new_tokens):
    ids = torch.tensor([ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, ids.shape[1]:].tolist()


def test_reference_loop_equals_generate_on_default_model(default_model):
    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer)
    for prompt in PROMPTS:
        result = decoder.generate(prompt, max_new_tokens=64)
        assert result.token_ids == hf_greedy(model, decoder.prepare(prompt), 64), prompt
        assert result.steps == result.new_tokens  # one base forward per token
        assert sum(result.accepted) == result.new_tokens


def test_streamed_text_equals_final_text(default_model):
    model, tokenizer = default_model
    stream = SpeculativeDecoder(model, tokenizer).stream(PROMPTS[1], max_new_tokens=40)
    chunks = list(stream)
    assert "".join(chunks) == stream.result.text
    assert stream.result.text == tokenizer.decode(stream.result.token_ids, skip_special_tokens=True)


def test_stop_string_cuts_text_and_tokens(default_model):
    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer)
    full = decoder.generate(PROMPTS[0], max_new_tokens=30)
    assert "Paris" in full.text
    stopped = decoder.generate(PROMPTS[0], max_new_tokens=30, stop=["Paris"])
    assert stopped.finish_reason == "stop"
    assert "Paris" not in stopped.text and full.text.startswith(stopped.text)
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(full.token_ids)


def test_max_new_tokens_and_eos(default_model):
    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer)
    short = decoder.generate(PROMPTS[2], max_new_tokens=5)
    assert short.new_tokens == 5 and short.finish_reason == "length"
    done = decoder.generate(PROMPTS[0], max_new_tokens=64)
    assert done.finish_reason == "stop" and done.token_ids[-1] in decoder.eos_ids


class _CharTokenizer:
    """Token i decodes to chr(ord('a') + i): enough to test the stop logic token by token."""

    def decode(self, ids, **_):
        return "".join(chr(ord("a") + i) for i in ids)


@pytest.mark.parametrize("stop,expected_text,expected_tokens", [
    (("cd",), "ab", 4),          # stop spans two tokens: text cut before it, generation ends at its last token
    (("x",), "abcdef", 6),       # never found: budget ends it
    (("bcz", "d"), "abc", 4),    # a held-back prefix that does not complete is released
])
def test_stop_condition_holds_back_possible_stop_prefixes(stop, expected_text, expected_tokens):
    cond = StopCondition(_CharTokenizer(), eos_ids={25}, max_new_tokens=6, stop_strings=stop)
    released = ""
    for token in range(6):
        released += cond.push(token)
        if cond.done:
            break
    assert released == cond.text == expected_text
    assert len(cond.tokens) == expected_tokens


def test_eos_inside_budget_stops():
    cond = StopCondition(_CharTokenizer(), eos_ids={2}, max_new_tokens=10)
    for token in [0, 1, 2, 3]:
        cond.push(token)
        if cond.done:
            break
    assert cond.tokens == [0, 1, 2] and cond.finish_reason == "stop"


@pytest.mark.parametrize("budget,eos_at", [(1000, None), (37, None), (1000, 23)])
def test_a_step_decoded_at_once_releases_what_token_by_token_does(default_model, budget, eos_at):
    """push_step (one decode per step) ends where push does (EOS, budget) and streams the same text, multi-byte
    characters split across tokens and steps included."""
    import random

    _, tokenizer = default_model
    ids = tokenizer("Über 5 Äpfel 🍎🍏 kosten 3,50 € — 苹果很好吃! ✓ naïve café\n  def f(x): return x**2",
                    add_special_tokens=False)["input_ids"] * 2
    eos = {tokenizer.eos_token_id}
    if eos_at is not None:
        ids[eos_at] = tokenizer.eos_token_id
    one = StopCondition(tokenizer, eos, budget)
    one_deltas = []
    for token in ids:
        one_deltas.append(one.push(token))
        if one.done:
            break
    rng = random.Random(0)
    chunked = StopCondition(tokenizer, eos, budget)
    chunk_deltas, start = [], 0
    while start < len(ids) and not chunked.done:
        size = rng.randint(1, 6)
        chunk_deltas.append(chunked.push_step(ids[start:start + size]))
        start += size
    assert "".join(chunk_deltas) == chunked.text == one.text == "".join(one_deltas)
    assert chunked.tokens == one.tokens and chunked.finish_reason == one.finish_reason
    assert one.text and ("\ufffd" not in one.text or one.finish_reason == "length")  # a cut may split a character


def test_the_rust_tokenizers_own_decode_gives_transformers_text(default_model, monkeypatch):
    """text.text_of takes the Rust tokenizer's decode where transformers' only forwards to it: the same text for
    windows of every length over multi-byte characters, special tokens and spaces."""
    from chimera.text import text_of

    _, tokenizer = default_model
    text = "  Über 5 Äpfel 🍎 — 苹果! ✓ naïve\n\tdef f(x): return x ** 2 ,  ."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id or 1, *ids, tokenizer.eos_token_id, *ids[:5]]
    windows = [ids[start:end] for start in range(len(ids)) for end in range(start, min(start + 6, len(ids)) + 1)]
    expected = [tokenizer.decode(w, skip_special_tokens=True, clean_up_tokenization_spaces=False) for w in windows]
    decode = text_of(tokenizer)
    monkeypatch.setattr(tokenizer, "decode", None)  # not called: the Rust tokenizer decodes
    assert [decode(w) for w in windows] == expected


def stops_at_a_stop_string(decoder, ids: list[int]) -> None:
    """A stop string taken from the middle of the text ends the same decoding there, itself left out."""
    text = decoder.generate(input_ids=ids, max_new_tokens=30).text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        cut = decoder.generate(input_ids=ids, max_new_tokens=30, stop=[stop])
        assert cut.finish_reason == "stop" and stop not in cut.text and text.startswith(cut.text)


class LoggedRead(StepRead):
    """StepRead that logs its calls, and the base forwards between them, into ``log``."""

    log: list = []

    def start(self, values):
        self.log.append("start")
        super().start(values)

    def result(self):
        self.log.append("result")
        return super().result()


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_steps_queued_ahead_on_a_slot_cache_decode_as_generate(family, default_model, monkeypatch):
    """On a slot cache the next greedy plain step is queued before the last one is read (what lets a GPU run it
    while the host works); it stops where generate does, by budget, EOS or stop string, and never queues past
    the budget."""
    _, tokenizer = default_model
    model = tiny_model(family)
    monkeypatch.setattr("chimera.generate.StepRead", LoggedRead)
    decoder = SpeculativeDecoder(model, tokenizer)
    decoder.verifier = SlotVerifier(model, graphs=False)
    score = SlotSession.score
    monkeypatch.setattr(SlotSession, "score", lambda self, *a: (LoggedRead.log.append("score"), score(self, *a))[1])
    gen = torch.Generator().manual_seed(5)
    for n, budget in ((3, 1), (6, 2), (9, 40), (20, 33)):
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        LoggedRead.log = []
        result = decoder.generate(input_ids=ids, max_new_tokens=budget)
        assert result.token_ids == hf_greedy(model, ids, budget)
        log = " ".join(LoggedRead.log)
        unread = log.count("score") - (result.steps - 1)  # forwards queued and never read: at most the one after
        assert unread in (0, 1) and (unread == 0 or result.finish_reason == "stop")  # an EOS, never past the budget
        if result.steps > 3:
            assert "start score result" in log  # the next forward queued between a step's read and its result
    stops_at_a_stop_string(decoder, torch.randint(3, 128, (7,), generator=gen).tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_steps_launched_before_a_read_decode_as_generate(family, default_model, monkeypatch):
    """With the slot cache and the drafter's fixed-shape functions (what a GPU replays), a speculative step keeps
    its path on the device, so the next step, drafted or not, is launched before the host reads this one
    (chimera/steps.py). The output is generate's, by budget, EOS or stop string; at most one step is launched and
    never read, and only when the text ended early (never past the budget); the host's lengths end equal to the
    device's."""
    from test_drafter import perturbed_drafter

    _, tokenizer = default_model
    model = tiny_model(family)
    monkeypatch.setattr("chimera.generate.StepRead", LoggedRead)
    drafter = perturbed_drafter(model, heads=5)
    gen = torch.Generator().manual_seed(11)
    for tree in ("small", DynamicTree(size=10, depth=4, beam=3)):
        decoder = as_on_a_gpu(SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False))
        one_by_one = as_on_a_gpu(SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False,
                                                    launch_ahead=False))
        for spied in (decoder, one_by_one):
            propose = spied.drafter.propose
            monkeypatch.setattr(spied.drafter, "propose",
                                lambda *a, propose=propose: (LoggedRead.log.append("propose"), propose(*a))[1])
        for n, budget in ((3, 1), (6, 2), (9, 40), (20, 33)):
            ids = torch.randint(3, 128, (n,), generator=gen).tolist()
            LoggedRead.log = []
            read_first = one_by_one.generate(input_ids=ids, max_new_tokens=budget)
            assert "start propose" not in " ".join(LoggedRead.log)  # each step read before the next is launched
            LoggedRead.log = []
            result = decoder.generate(input_ids=ids, max_new_tokens=budget)
            assert result.token_ids == read_first.token_ids == hf_greedy(model, ids, budget)
            assert result.accepted == read_first.accepted  # the same steps, only launched earlier
            assert sum(result.accepted) == result.new_tokens and len(result.accepted) == result.steps
            log = " ".join(LoggedRead.log)
            unread = log.count("propose") - (result.steps - 1)
            assert unread in (0, 1) and (unread == 0 or result.finish_reason == "stop")
            if result.steps > 3:
                assert "start propose result" in log  # a speculative step launched between a read's start and end
        # between two pieces of text the host's lengths are the device's, less the one step launched ahead
        width = decoder.tree.topology.max_depth + 1
        ids = torch.randint(3, 128, (8,), generator=gen).tolist()
        for _ in decoder.stream(input_ids=ids, max_new_tokens=40):
            bank, state = next(iter(decoder.verifier.banks.values())), decoder.drafter.state
            assert state.length == bank.cache.length
            assert 0 <= int(bank.prefix) - bank.cache.length <= width
            assert int(state.length_on_device) - state.length == int(bank.prefix) - bank.cache.length
    stops_at_a_stop_string(decoder, torch.randint(3, 128, (7,), generator=gen).tolist())


class OracleDrafter:
    """Drafts a chain of the reference continuation itself, so that every step accepts its whole path: the
    longest paths, where a step launched ahead starts furthest past the text's end. Its position stays on the
    device, as GraphedDrafter's does."""

    def __init__(self, reference: list[int]):
        self.reference = torch.tensor(reference + [0] * 64)

    def start(self, prompt_ids, hidden):
        return {"position": torch.tensor(prompt_ids.numel())}

    def propose(self, state, root, tree):
        return self.reference[state["position"] + torch.arange(tree.topology.size)]

    def advance(self, state, tokens, hidden):
        state["position"] += tokens.numel()

    def advance_counted(self, state, tokens, hidden, count):
        state["position"] += count

    def confirm(self, state, length):
        pass


def test_a_step_launched_ahead_after_the_longest_path_fits_the_cache(default_model, monkeypatch):
    """A step launched before the last one is read may start after that one's whole path, past the text's end:
    the slot cache leaves room for it (generate.py), here with capacities exactly as asked (no power-of-two slack)."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    monkeypatch.setattr("chimera.verifier.power_of_two_at_least", lambda n, smallest: n)
    from test_drafter import perturbed_drafter

    decoder = SpeculativeDecoder(model, tokenizer, perturbed_drafter(model, heads=5), tree="chain4", adaptive=False)
    decoder.verifier = SlotVerifier(model, graphs=False)
    ids = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    for budget in (11, 12, 13, 14, 15):
        reference = hf_greedy(model, ids, budget + 10)
        decoder.drafter = OracleDrafter(ids + reference)
        result = decoder.generate(input_ids=ids, max_new_tokens=budget)
        assert result.token_ids == reference[:len(result.token_ids)] and result.steps < budget


@pytest.mark.parametrize("launch_ahead", [True, False], ids=["launched ahead", "read first"])
def test_the_drafters_reading_of_the_accepted_path_is_timed_as_drafting(launch_ahead, default_model, monkeypatch):
    """The time split (GenerationResult.time_draft / time_verify / time_other): the drafter reading each step's
    accepted path into its state (``advance_counted`` on the device, or ``advance`` after the read) counts as
    drafting, not as verifying or the host's rest. Each advance is slowed here by a sleep the split must place."""
    import time

    from test_drafter import perturbed_drafter

    _, tokenizer = default_model
    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=5)
    decoder = as_on_a_gpu(SpeculativeDecoder(model, tokenizer, drafter, tree="small", adaptive=False,
                                             launch_ahead=launch_ahead))
    advances = []
    pause = 0.05
    for name in ("advance", "advance_counted"):
        original = getattr(decoder.drafter, name)

        def slowed(*args, original=original):
            advances.append(1)
            time.sleep(pause)
            return original(*args)
        monkeypatch.setattr(decoder.drafter, name, slowed)
    ids = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    result = decoder.generate(input_ids=ids, max_new_tokens=24)
    slept = pause * len(advances)
    assert len(advances) >= 3
    assert result.time_draft >= slept
    assert result.time_verify < slept / 2 and result.time_other < slept / 2
    parts = result.time_prefill + result.time_draft + result.time_verify + result.time_other
    assert parts <= result.seconds * 1.01 + 1e-3
