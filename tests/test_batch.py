"""Continuous batching of plain decoding: every sequence of a running batch decodes token for token what it
decodes alone (float32), whatever joins or leaves around it."""

import types

import pytest
import torch

from chimera import SpeculativeDecoder
from chimera.batch import DRAFT_DEPTH, RunningBatch
from chimera.errors import ChimeraError
from chimera.graph_runner import GraphRunner
from chimera.sampling import SamplingConfig
from chimera.text import encode_prompt
from conftest import FAMILIES, tiny_model
from test_drafter import perturbed_drafter


def alone(model, tokenizer, prompt, max_new_tokens, stop=(), **sampling):
    decoder = SpeculativeDecoder(model, tokenizer, None, adaptive=False)
    return decoder.generate(input_ids=prompt, max_new_tokens=max_new_tokens, stop=stop, **sampling)


def drain(batch, sequences, texts, schedule=()):
    """Step until every sequence is done, adding the scheduled ones at their step; returns results by name."""
    results, step = {}, 0
    pending = list(schedule)
    while batch.running or pending:
        for when, name, args in [p for p in pending if p[0] <= step]:
            pending.remove((when, name, args))
            sequence, text = batch.add(*args)
            sequences[name], texts[name] = sequence, text
        for sequence, text in batch.step():
            name = next(k for k, v in sequences.items() if v is sequence)
            texts[name] += text
        for name, sequence in list(sequences.items()):
            if sequence.done and sequence in batch.running:
                batch.remove(sequence)
                results[name] = sequence.result()
        step += 1
    return results


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["exact rows", "padded rows"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_sequence_of_a_running_batch_is_what_it_is_alone(family, fixed_shapes, default_model):
    """Padded rows: what a GPU replays (a power-of-two number of rows, idle ones padded), run eagerly."""
    _, tokenizer = default_model  # decodes the tiny vocabulary's ids; EOS 2 is the tiny models' too
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(3)
    prompts = {f"p{i}": torch.randint(3, 128, (n,), generator=gen).tolist() for i, n in enumerate((5, 17, 9, 30))}
    budgets = {"p0": 20, "p1": 7, "p2": 25, "p3": 12}  # they finish at different steps
    # 3 running sequences: 4 rows with one idle where shapes are fixed
    batch = RunningBatch(model, tokenizer, max_batch=4 if fixed_shapes else 3, capacity=128,
                         fixed_shapes=fixed_shapes)
    assert not batch.runner.graphs  # a CPU: the same functions a GPU captures, run as they are
    rows_run = []
    plain_forward = batch._plain_forward
    batch._plain_forward = lambda window, tokens, positions: (rows_run.append(tokens.shape[0]),
                                                              plain_forward(window, tokens, positions))[1]
    sequences, texts = {}, {}
    for name in ("p0", "p1"):
        sequences[name], texts[name] = batch.add(prompts[name], budgets[name])
    # p2 joins at step 3, p3 once p1 has left (the batch holds 3)
    results = drain(batch, sequences, texts, [(3, "p2", (prompts["p2"], budgets["p2"])),
                                              (9, "p3", (prompts["p3"], budgets["p3"]))])
    for name, prompt in prompts.items():
        expected = alone(model, tokenizer, prompt, budgets[name])
        x = torch.tensor([prompt])
        ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=budgets[name],
                             eos_token_id=2, pad_token_id=0)
        assert results[name].token_ids == expected.token_ids, name
        assert results[name].token_ids == ref[0, len(prompt):].tolist()[:len(expected.token_ids)], name
        assert results[name].text == texts[name] == expected.text
        assert results[name].finish_reason == expected.finish_reason
    assert (4 in rows_run) == fixed_shapes and (3 in rows_run) != fixed_shapes  # 3 running: padded to 4, or 3


def counting_backend():
    """A torch.compile backend that runs the graph Dynamo traced as it is, and the list of its compilations."""
    compilations = []

    def counting(graph, example_inputs):
        compilations.append(len(example_inputs))
        return graph.forward

    return counting, compilations


class RecordingRunner(GraphRunner):
    """A GraphRunner as on a GPU, run eagerly on a CPU: a capture runs its function three times over copies of its
    inputs (as capture_graph's warm-up and capture do), and every run notes whether its key was captured first."""

    def __init__(self):
        super().__init__(graphs=True)
        self.uncaptured: list = []

    def capture(self, key, fn, *inputs, warmup=2):
        static = tuple(x.clone() for x in inputs)
        self.captured[key] = (None, static, [fn(*static) for _ in range(warmup + 1)][-1])

    def run(self, key, fn, *inputs):
        if key not in self.captured:
            self.uncaptured.append(key)
            self.capture(key, fn, *inputs)
        return fn(*inputs)


def test_a_warmed_up_batch_meets_no_new_shape_and_decodes_the_same(default_model):
    _, tokenizer = default_model
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(4)
    prompts = {f"p{i}": torch.randint(3, 128, (n,), generator=gen).tolist() for i, n in enumerate((5, 60, 9))}
    budgets = {"p0": 20, "p1": 30, "p2": 25}  # p1 crosses from a 64-slot window into the 128-slot one
    outputs = {}
    for warmed in (False, True):
        batch = RunningBatch(model, tokenizer, max_batch=3, capacity=128, fixed_shapes=True)
        batch.runner = RecordingRunner()
        if warmed:
            batch.warm_up()
            # rows 1, 2 and 3 (the batch's size caps the last bucket) over windows of 64 and 128 slots
            # and prefills padded to 16, 32, 64 and 128 tokens
            assert set(batch.runner.captured) == ({("plain", r, w) for r in (1, 2, 3) for w in (64, 128)}
                                                  | {("prefill", n) for n in (16, 32, 64, 128)})
        sequences, texts = {}, {}
        sequences["p0"], texts["p0"] = batch.add(prompts["p0"], budgets["p0"])
        results = drain(batch, sequences, texts, [(2, "p1", (prompts["p1"], budgets["p1"])),
                                                  (4, "p2", (prompts["p2"], budgets["p2"]))])
        outputs[warmed] = {name: r.token_ids for name, r in results.items()}
        assert bool(batch.runner.uncaptured) != warmed  # cold, the steps met shapes first; warmed, none
    assert outputs[True] == outputs[False]  # the captures' writes to each row's last slot change nothing


def test_stop_strings_and_seeded_sampling_in_a_batch_are_as_alone(default_model):
    model, tokenizer = default_model
    prompts = [encode_prompt(tokenizer, q) for q in ("Count from one to ten in words.", "Name three colors.", "Say hi.")]
    configs = [dict(), dict(temperature=0.9, top_p=0.9, seed=7), dict(temperature=1.0, top_k=20, seed=1)]
    stops = [("4.",), (), ("\n",)]
    # the server's batch runs through the model its decoder verifies with: on this CPU the prepacked copy
    batch = RunningBatch(SpeculativeDecoder(model, tokenizer, None).verifier.model, tokenizer, max_batch=4,
                         capacity=256)
    sequences, texts = {}, {}
    for i, (prompt, config, stop) in enumerate(zip(prompts, configs, stops)):
        sequences[i], texts[i] = batch.add(prompt, 24, stop, SamplingConfig(**config))
    results = drain(batch, sequences, texts)
    for i, (prompt, config, stop) in enumerate(zip(prompts, configs, stops)):
        expected = alone(model, tokenizer, prompt, 24, stop, **config)
        assert results[i].token_ids == expected.token_ids and results[i].text == expected.text == texts[i], i
    assert results[0].finish_reason == "stop" and results[0].text == "1. 1\n2. 2\n3. 3\n"  # the stop string ended it


def test_a_running_batch_refuses_what_does_not_fit(default_model):
    _, tokenizer = default_model
    batch = RunningBatch(tiny_model("llama"), tokenizer, max_batch=1, capacity=32)
    assert batch.fits(20, 12) and not batch.fits(20, 13)
    with pytest.raises(ChimeraError, match="holds 32"):
        batch.add(list(range(3, 40)), 4)
    batch.add([5, 6, 7], 4)
    with pytest.raises(ChimeraError, match="full"):
        batch.add([5, 6, 7], 4)


@pytest.mark.parametrize("after_pieces, copied", [(1, True), (5, True), (5, False)])
def test_a_decoding_begun_alone_continues_in_a_batch_as_it_would_alone(default_model, after_pieces, copied):
    """The server moves a request decoded alone (speculatively, with the shipped drafter) into its running batch
    when others arrive, its KV copied from the lone decoding's cache (or re-read by a prefill): the text goes on
    exactly as alone, stop string included."""
    from chimera.drafters import resolve_drafter

    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="5", adaptive=False)
    prompt = encode_prompt(tokenizer, "Count from one to twenty, one number per line.")
    expected = decoder.generate(input_ids=prompt, max_new_tokens=48, stop=("15",))
    other = encode_prompt(tokenizer, "Name three colors.")
    expected_other = alone(model, tokenizer, other, 20)

    batch = RunningBatch(decoder.verifier.model, tokenizer, max_batch=2, capacity=256)
    sequences, texts = {}, {}
    sequences["other"], texts["other"] = batch.add(other, 20)
    stream = decoder.stream(input_ids=prompt, max_new_tokens=48, stop=("15",))
    chunks = iter(stream)
    texts["moved"] = "".join(next(chunks) for _ in range(after_pieces))
    progress = stream.progress
    steps_alone = len(progress.result.accepted)
    if not copied:
        progress.verified_kv = None
    prefills = []
    prefill = batch._prefill
    batch._prefill = lambda *args: prefills.append(1) or prefill(*args)
    sequences["moved"] = batch.adopt(progress)
    assert len(prefills) == (0 if copied else 1)
    chunks.close()
    results = drain(batch, sequences, texts)
    assert results["moved"].token_ids == expected.token_ids
    assert results["moved"].text == texts["moved"] == expected.text and results["moved"].finish_reason == "stop"
    assert results["moved"].accepted[:steps_alone] == progress.result.accepted[:steps_alone]
    assert results["moved"].steps == len(results["moved"].accepted) > steps_alone
    assert sum(results["moved"].accepted) == len(expected.token_ids)
    assert results["other"].token_ids == expected_other.token_ids


def test_only_a_running_decoding_that_fits_a_row_can_continue_in_a_batch(default_model):
    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer, None)
    stream = decoder.stream(input_ids=[5, 6, 7], max_new_tokens=40)
    chunks = iter(stream)
    next(chunks)
    with pytest.raises(ChimeraError, match="row holds 32"):
        RunningBatch(model, tokenizer, max_batch=1, capacity=32).adopt(stream.progress)
    for _ in chunks:
        pass
    with pytest.raises(ChimeraError, match="not stopped"):
        RunningBatch(model, tokenizer, max_batch=1, capacity=256).adopt(stream.progress)


@pytest.mark.parametrize("sampled, copied", [(False, False), (False, True), (True, True)])
def test_a_sequence_of_a_batch_continues_alone_as_it_would_in_the_batch(default_model, sampled, copied, monkeypatch):
    """When the server's batch is down to one member, that one continues alone, speculatively with the shipped
    drafter (SpeculativeDecoder.resume), with its KV and hidden states copied from the batch (or re-read by a
    prefill): greedy, its text is what it is alone; sampled with a seed, its generator goes along (the draws
    continue rather than restart)."""
    from chimera.verifier import GrowingSession
    from chimera.drafters import resolve_drafter

    model, tokenizer = default_model
    # a tree given, not calibrated: the calibration may choose plain decoding on this machine (it does on an Intel
    # Xeon), and this test is about speculating alone after the batch
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="5", adaptive=False)
    prompt = encode_prompt(tokenizer, "List the planets of the solar system, one per line.")
    sampling = dict(temperature=0.8, seed=5) if sampled else {}
    batch = RunningBatch(decoder.verifier.model, tokenizer, max_batch=2, capacity=256)
    sequence, text = batch.add(prompt, 40, ("Saturn",), SamplingConfig(**sampling))
    short, _ = batch.add(encode_prompt(tokenizer, "Say hi."), 3)
    while not short.done:
        for member, piece in batch.step():
            text += piece if member is sequence else ""
    batch.remove(short)
    steps_in_batch = len(sequence.accepted)
    progress = batch.progress_of(sequence) if copied else sequence.progress()
    batch.remove(sequence)
    prefills = []
    prefill = GrowingSession.prefill
    monkeypatch.setattr(GrowingSession, "prefill", lambda self, prompt: prefills.append(1) or prefill(self, prompt))
    stream = decoder.resume(progress)
    text += "".join(stream)
    assert len(prefills) == (0 if copied else 1)
    result = stream.result
    assert result.text == text and sum(result.accepted) == len(result.token_ids)
    assert result.accepted[:steps_in_batch] == [1] * steps_in_batch and result.steps == len(result.accepted)
    if not sampled:
        expected = decoder.generate(input_ids=prompt, max_new_tokens=40, stop=("Saturn",))
        assert result.token_ids == expected.token_ids and result.text == expected.text
        assert result.finish_reason == expected.finish_reason
        assert max(result.accepted[steps_in_batch:]) > 1  # it speculated once alone
    else:
        assert progress.generator is not None and stream.progress.generator is progress.generator
        assert result.finish_reason in ("stop", "length") and len(result.token_ids) <= 40


def test_a_sequence_reads_its_tokens_across_prompt_and_output():
    from chimera.batch import Sequence
    from chimera.drafters.rows import PAD

    sequence = Sequence([5, 6, 7], types.SimpleNamespace(tokens=[8, 9]), SamplingConfig(), None)
    assert sequence.tokens_at(-2, 7) == [PAD, PAD, 5, 6, 7, 8, 9, 0, 0]
    assert sequence.tokens_at(1, 4) == [6, 7, 8] and sequence.tokens_at(3, 5) == [8, 9]
    assert sequence.tokens_at(4, 6) == [9, 0] and sequence.tokens_at(-1, 1) == [PAD, 5]


def test_a_row_takes_copied_keys_and_values_only_where_they_fit():
    from chimera.cache import RowSlotCache

    cache = RowSlotCache(num_layers=2, row_count=2, capacity=8, device="cpu")
    pair = (torch.ones(1, 3, 4, 5), torch.ones(1, 3, 4, 5))
    assert not cache.write_row(0, [pair, pair])  # nothing allocated yet
    for layer in cache.layers:
        layer.lazy_initialization(torch.zeros(1, 3, 1, 5), torch.zeros(1, 3, 1, 5))
    assert not cache.write_row(0, [pair])  # a layer short
    assert not cache.write_row(0, [(torch.ones(1, 2, 4, 5),) * 2] * 2)  # other heads
    assert not cache.write_row(0, [(torch.ones(1, 3, 8, 5),) * 2] * 2)  # no room left for a next token
    assert cache.write_row(1, [pair, (2 * pair[0], 2 * pair[1])])
    assert cache.layers[1].keys[1, :, :4].eq(2).all() and cache.layers[1].keys[1, :, 4:].eq(0).all()
    assert cache.layers[0].keys[0].eq(0).all()


class BatchOracle:
    """Drafts each sequence's own reference continuation, so that every chain is accepted whole (until the
    reference ends): the longest steps a drafting batch takes. It knows a row's sequence from the prompt its row
    reads first (from position 0)."""

    def __init__(self, references: dict[tuple, list[int]]):
        self.references = {prompt: torch.tensor(list(prompt) + tokens + [0] * 256) for prompt, tokens in
                           references.items()}

    def rows(self, count, capacity, device):
        oracle = types.SimpleNamespace(of_row=[None] * count)

        def read(rows, tokens, hidden, starts):
            assert hidden.shape[:2] == (tokens.shape[0], tokens.shape[1] - 2)
            for row, row_tokens, start in zip(rows.tolist(), tokens.tolist(), starts.tolist()):
                if start == 0:
                    oracle.of_row[row] = next((ref for prompt, ref in self.references.items()
                                               if tuple(row_tokens[2:2 + len(prompt)]) == prompt), None)

        def propose(tokens, starts, last_hidden, depth, attended):
            assert last_hidden.shape[0] == tokens.shape[0] == starts.shape[0]
            return torch.stack([oracle.of_row[row][start + torch.arange(depth + 1)] if oracle.of_row[row] is not None
                                else tokens[row, 2].repeat(depth + 1) for row, start in enumerate(starts.tolist())])

        def move(source, target, length):
            oracle.of_row[target] = oracle.of_row[source]

        oracle.read, oracle.propose, oracle.move = read, propose, move
        oracle.compile = lambda backend: None  # it reads its references on the host
        return oracle


def with_references(model, tokenizer, seed: int, budgets_by_length: dict[int, int]):
    """Prompts p0, p1, ... of random tokens of the given lengths, their budgets, what each decodes alone, and an
    oracle that drafts each one's own continuation."""
    gen = torch.Generator().manual_seed(seed)
    prompts = {f"p{i}": torch.randint(3, 128, (n,), generator=gen).tolist() for i, n in enumerate(budgets_by_length)}
    budgets = dict(zip(prompts, budgets_by_length.values()))
    expected = {name: alone(model, tokenizer, prompt, budgets[name]) for name, prompt in prompts.items()}
    return prompts, budgets, expected, BatchOracle({tuple(prompts[n]): expected[n].token_ids for n in prompts})


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["exact rows", "padded rows"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_drafting_batch_decodes_each_sequence_as_alone(family, fixed_shapes, default_model):
    """Chains drafted for every row at once and verified in one forward: every sequence is what it is alone,
    whether its chains are accepted whole (an oracle drafter) or mostly rejected (a real drafter of random weights),
    with sequences joining, finishing at different steps and leaving mid-way, and idle rows padded or not."""
    _, tokenizer = default_model
    model = tiny_model(family)
    prompts, budgets, expected, oracle = with_references(model, tokenizer, 5, {6: 22, 19: 9, 11: 26, 27: 14})
    for drafter in (oracle, perturbed_drafter(model, heads=DRAFT_DEPTH)):
        batch = RunningBatch(model, tokenizer, max_batch=3, capacity=128, drafter=drafter, adaptive=False,
                             fixed_shapes=fixed_shapes)
        sequences, texts = {}, {}
        for name in ("p0", "p1"):
            sequences[name], texts[name] = batch.add(prompts[name], budgets[name])
        results = drain(batch, sequences, texts, [(2, "p2", (prompts["p2"], budgets["p2"])),
                                                  (10, "p3", (prompts["p3"], budgets["p3"]))])
        for name in prompts:
            assert results[name].token_ids == expected[name].token_ids, (name, drafter)
            assert results[name].text == texts[name] == expected[name].text
            assert results[name].finish_reason == expected[name].finish_reason
            assert sum(results[name].accepted) == len(results[name].token_ids)
        if drafter is oracle:  # whole chains accepted: a step emits the chain and the base's next token
            assert all(max(results[name].accepted) == DRAFT_DEPTH + 1 for name in prompts)
            assert all(results[name].steps < len(results[name].token_ids) for name in prompts)


def test_a_member_without_a_drafter_state_rides_along(default_model):
    """A sequence that joined with copied keys and values has no drafter state: the others still draft, it keeps
    one token a step, and both are what they are alone."""
    _, tokenizer = default_model
    model = tiny_model("qwen2")
    prompts = [[5, 9, 23, 41, 17], [7, 7, 30, 3, 11, 64]]
    expected = [alone(model, tokenizer, prompt, 14) for prompt in prompts]
    oracle = BatchOracle({tuple(p): e.token_ids for p, e in zip(prompts, expected)})
    batch = RunningBatch(model, tokenizer, max_batch=2, capacity=64, drafter=oracle, adaptive=False)
    sequences, texts = {}, {}
    for i, prompt in enumerate(prompts):
        sequences[i], texts[i] = batch.add(prompt, 14)
    sequences[1].drafted = None  # as after a join by copy
    results = drain(batch, sequences, texts)
    assert [r.token_ids for r in results.values()] == [e.token_ids for e in expected]
    assert max(results[0].accepted) == DRAFT_DEPTH + 1 and max(results[1].accepted) == 1


def test_a_batch_with_a_sampled_member_does_not_draft(default_model):
    """A sampled member's draws must stay those of its plain decoding: while it runs, the batch steps plainly."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    prompts = [[5, 9, 23, 41], [7, 7, 30, 2, 11, 64]]
    greedy = alone(model, tokenizer, prompts[0], 16)
    sampled = alone(model, tokenizer, prompts[1], 8, temperature=0.8, seed=3)
    oracle = BatchOracle({tuple(prompts[0]): greedy.token_ids, tuple(prompts[1]): sampled.token_ids})
    batch = RunningBatch(model, tokenizer, max_batch=2, capacity=64, drafter=oracle, adaptive=False)
    sequences, texts = {}, {}
    sequences["g"], texts["g"] = batch.add(prompts[0], 16)
    sequences["s"], texts["s"] = batch.add(prompts[1], 8, (), SamplingConfig(temperature=0.8, seed=3))
    results = drain(batch, sequences, texts)
    assert results["g"].token_ids == greedy.token_ids and results["s"].token_ids == sampled.token_ids
    steps_together = len(results["s"].accepted) - 1
    assert results["g"].accepted[1:steps_together + 1] == [1] * steps_together  # plain while the sampled one ran
    assert max(results["g"].accepted) == DRAFT_DEPTH + 1  # and whole chains once it had left


def test_the_shipped_drafter_drafts_in_a_batch_as_alone(default_model):
    """The real model and its shipped drafter, as the server's engine runs them (the verifier's model, the decoder's
    drafter with its draft vocabulary): every greedy sequence is what it is alone, a stop string included, and some
    drafted tokens are accepted."""
    from chimera.drafters import resolve_drafter

    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="5")  # drafting, calibrated or not
    prompts = [encode_prompt(tokenizer, q) for q in ("Count from one to ten in words.", "Name three colors.",
                                                     "Write a haiku about the sea.")]
    stops = [("4.",), (), ()]
    batch = RunningBatch(decoder.verifier.model, tokenizer, max_batch=3, capacity=256, drafter=decoder.drafter,
                         adaptive=False)
    sequences, texts = {}, {}
    for i, (prompt, stop) in enumerate(zip(prompts, stops)):
        sequences[i], texts[i] = batch.add(prompt, 32, stop)
    results = drain(batch, sequences, texts)
    for i, (prompt, stop) in enumerate(zip(prompts, stops)):
        expected = alone(model, tokenizer, prompt, 32, stop)
        assert results[i].token_ids == expected.token_ids and results[i].text == expected.text == texts[i], i
    assert results[0].finish_reason == "stop"
    assert sum(r.new_tokens for r in results.values()) > sum(len(r.accepted) - 1 for r in results.values())


def test_a_prompt_is_read_into_the_drafter_at_its_join_as_catching_up_would_read_it(default_model):
    """A joining sequence's prompt goes into its row's drafter state with its prefill, so a first drafted step has
    nothing to catch up: the keys and values are those that catching up at that step would have written."""
    from chimera.drafters import resolve_drafter

    model, tokenizer = default_model
    batch = RunningBatch(model, tokenizer, max_batch=2, capacity=64, drafter=resolve_drafter("auto", model),
                         adaptive=False)
    batch.add([5, 6, 7], 4)
    sequence, _ = batch.add(encode_prompt(tokenizer, "Name three colors."), 4)
    n = sequence.length
    assert sequence.drafted == n
    joined = batch.drafts.keys[1, :, :n].clone(), batch.drafts.values[1, :, :n].clone()
    assert joined[0].abs().sum() > 0
    batch.drafts.keys[1].zero_()
    batch.drafts.values[1].zero_()
    sequence.drafted = 0
    batch._catch_up(batch.running)
    assert sequence.drafted == n
    assert torch.equal(batch.drafts.keys[1, :, :n], joined[0]) and torch.equal(batch.drafts.values[1, :, :n], joined[1])


def test_the_engine_drafts_in_its_batch_only_when_asked(default_model):
    from chimera.drafters import resolve_drafter
    from chimera.server.engine import Engine

    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="5")  # drafting, calibrated or not
    assert decoder.drafter is not None
    assert Engine(decoder, max_batch=2).batch.drafts is None  # off by default (docs/benchmarks.md, session 12)
    drafts = Engine(decoder, max_batch=2, batch_drafting=True).batch.drafts
    assert drafts.drafter is getattr(decoder.drafter, "drafter", decoder.drafter)


@pytest.mark.parametrize("captured", [False, True], ids=["prefills as they are", "padded prefills"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_compiled_batch_decodes_as_alone_and_compiles_once_for_any_rows(family, captured, default_model):
    """The GPU's compiled plain step (rows a symbol, every slot attended) and, where captured, its compiled padded
    prefills (the length a symbol), traced here by Dynamo with a backend that runs the traced graph as it is and
    counts compilations."""
    _, tokenizer = default_model
    model = tiny_model(family)
    counting, compilations = counting_backend()
    gen = torch.Generator().manual_seed(8)
    prompts = {f"p{i}": torch.randint(3, 128, (n,), generator=gen).tolist() for i, n in enumerate((5, 17, 9))}
    budgets = {"p0": 14, "p1": 6, "p2": 12}
    batch = RunningBatch(model, tokenizer, max_batch=4, capacity=128, fixed_shapes=True, compiled=True,
                         backend=counting)
    assert batch.decoder is not None and batch._window(3) == 64
    if captured:
        batch.runner = RecordingRunner()
    sequences, texts = {}, {}
    sequences["p0"], texts["p0"] = batch.add(prompts["p0"], budgets["p0"])
    results = drain(batch, sequences, texts, [(1, "p1", (prompts["p1"], budgets["p1"])),
                                              (2, "p2", (prompts["p2"], budgets["p2"]))])
    for name, prompt in prompts.items():
        expected = alone(model, tokenizer, prompt, budgets[name])
        assert results[name].token_ids == expected.token_ids, name
        assert results[name].text == texts[name] == expected.text
    assert batch.decoder.failure is None
    # rows 1 (padded to 2), 2 and 4 alike; padded prefills of 16 and 32 tokens alike (the first forward, which
    # allocates the KV memory, runs uncompiled)
    assert len(compilations) == 1 + captured
    if captured:
        assert {("prefill", 16), ("prefill", 32)} <= set(batch.runner.captured)
    # another batch of the same model, of other rows and row capacity (a server's, after a benchmark's warm-up one),
    # replays what was compiled: the buffers' sizes are symbols too
    other = RunningBatch(model, tokenizer, max_batch=8, capacity=256, fixed_shapes=True, compiled=True,
                         backend=counting)
    if captured:
        other.runner = RecordingRunner()
    sequences, texts = {}, {}
    sequences["p0"], texts["p0"] = other.add(prompts["p0"], budgets["p0"])
    again = drain(other, sequences, texts, [(1, "p1", (prompts["p1"], budgets["p1"]))])
    assert {name: r.token_ids for name, r in again.items()} == {n: results[n].token_ids for n in ("p0", "p1")}
    assert len(compilations) == 1 + captured


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_prefills_padded_to_their_length_bucket_decode_as_alone(family, default_model):
    """A GPU's prefill, run eagerly: the prompt padded to a power of two, its row and last position read on the
    device (one capture per padded length serves every row); each sequence still decodes what it does alone."""
    _, tokenizer = default_model
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(9)
    prompts = {f"p{i}": torch.randint(3, 128, (n,), generator=gen).tolist() for i, n in enumerate((5, 17, 40))}
    budgets = {"p0": 12, "p1": 9, "p2": 10}
    batch = RunningBatch(model, tokenizer, max_batch=4, capacity=128, fixed_shapes=True)
    batch.runner = RecordingRunner()
    sequences, texts = {}, {}
    for name in ("p0", "p1"):
        sequences[name], texts[name] = batch.add(prompts[name], budgets[name])
    results = drain(batch, sequences, texts, [(3, "p2", (prompts["p2"], budgets["p2"]))])
    assert {key for key in batch.runner.captured if key[0] == "prefill"} == {("prefill", 16), ("prefill", 32),
                                                                              ("prefill", 64)}
    for name, prompt in prompts.items():
        assert results[name].token_ids == alone(model, tokenizer, prompt, budgets[name]).token_ids, name


def test_chains_verified_by_a_compiled_forward_per_depth_decode_as_alone(default_model):
    """``verify_graphs="per-depth"``: the forward that verifies drafted chains compiled once a depth (the chain's
    length a constant, as a plain step's is) instead of once for every depth; each sequence still decodes what it
    does alone, the oracle's chains accepted whole. Any other choice is refused, as is an unknown attention of a
    chain (attention.CHAIN_ATTENTION)."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    counting, compilations = counting_backend()
    prompts, budgets, expected, oracle = with_references(model, tokenizer, 12, {5: 14, 17: 7, 9: 10})
    batch = RunningBatch(model, tokenizer, max_batch=4, capacity=64, drafter=oracle, adaptive=False,
                         fixed_shapes=True, compiled=True, backend=counting, verify_graphs="per-depth")
    batch.add([3, 4], 1)  # the KV memory is allocated by a first forward, uncompiled
    batch.remove(batch.running[0])
    batch.runner = RecordingRunner()
    batch.warm_up()
    sequences, texts = {}, {}
    for name in ("p0", "p1"):
        sequences[name], texts[name] = batch.add(prompts[name], budgets[name])
    results = drain(batch, sequences, texts, [(1, "p2", (prompts["p2"], budgets["p2"]))])
    assert batch.runner.uncaptured == [] and batch.decoder.failure is None
    for name in prompts:
        assert results[name].token_ids == expected[name].token_ids, name
        assert max(results[name].accepted) == DRAFT_DEPTH + 1
    # prefills and plain steps once each, the verifying forward once a depth (the oracle drafts on the host)
    assert len(compilations) == 2 + DRAFT_DEPTH
    with pytest.raises(ChimeraError, match="verify_graphs must be one of shared, per-depth"):
        RunningBatch(model, tokenizer, max_batch=2, verify_graphs="each")
    with pytest.raises(ChimeraError, match="chain_attention must be one of grouped, folded"):
        RunningBatch(model, tokenizer, max_batch=2, chain_attention="flat")


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_warmed_up_compiled_drafting_batch_meets_no_new_shape_and_decodes_as_alone(family, default_model):
    """The GPU's drafting batch run eagerly: shapes captured by ``warm_up`` (a capture runs a step three times over
    its inputs, so a step must write the same whatever it ran after), the forwards traced by Dynamo with rows a
    symbol (one compilation for chains of any number of rows, a lone member padded to two), chains drafted for every
    row at once: each sequence is what it is alone, the oracle's chains accepted whole and a random drafter's not."""
    _, tokenizer = default_model
    model = tiny_model(family)
    counting, compilations = counting_backend()
    prompts, budgets, expected, oracle = with_references(model, tokenizer, 11, {5: 20, 17: 7, 9: 15, 50: 20})
    for drafter in (oracle, perturbed_drafter(model, heads=DRAFT_DEPTH)):
        batch = RunningBatch(model, tokenizer, max_batch=4, capacity=128, drafter=drafter, adaptive=False,
                             fixed_shapes=True, compiled=True, backend=counting)
        batch.add([3, 4], 1)  # the KV memory is allocated by a first forward, uncompiled
        batch.remove(batch.running[0])
        batch.runner = RecordingRunner()
        batch.warm_up()
        assert {key[0] for key in batch.runner.captured} == {"prefill", "plain", "chains"}
        # every rows bucket's steps over every window timed, to seed each size's choice of depth: all depths, each a
        # positive time
        assert sorted(batch.warm_costs) == [(2, 64), (2, 128), (4, 64), (4, 128)]
        assert all(sorted(costs) == list(range(DRAFT_DEPTH + 1)) and min(costs.values()) > 0
                   for costs in batch.warm_costs.values())
        sequences, texts = {}, {}
        for name in ("p0", "p1"):
            sequences[name], texts[name] = batch.add(prompts[name], budgets[name])
        results = drain(batch, sequences, texts, [(1, "p2", (prompts["p2"], budgets["p2"])),
                                                  (3, "p3", (prompts["p3"], budgets["p3"]))])
        assert batch.runner.uncaptured == [] and batch.decoder.failure is None
        for name in prompts:
            assert results[name].token_ids == expected[name].token_ids, (name, drafter)
            assert results[name].text == texts[name] == expected[name].text
        if drafter is oracle:
            assert all(max(results[name].accepted) == DRAFT_DEPTH + 1 for name in prompts)
    # prefills, plain steps and chains of any number of rows over any window (one member padded to two; p3 steps over
    # 64 slots, then 128): compiled once each; the Chimera drafter's chains once a depth (the oracle's are its own,
    # read on the host)
    assert len(compilations) == 3 + DRAFT_DEPTH
