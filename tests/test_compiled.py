"""The compiled switch: a compiler that fails leaves decoding on the uncompiled forward, with one warning."""

import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from chimera import target
from chimera.compiled import Compiled, CompiledDecoder, compilable
from chimera.generate import warm_up_lengths
from chimera.graph_runner import GraphRunner, power_of_two_at_least
from chimera.tree import TreeBuffers, TreeTopology
from chimera.verifier import SlotBank, SlotVerifier
from conftest import tiny_model


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no kernels for this model")


def test_a_failing_compiler_falls_back_to_the_uncompiled_forward_once(caplog):
    model = tiny_model("llama")
    eager = SlotBank(model, capacity=64, device=torch.device("cpu"))
    failing = SlotBank(model, capacity=64, device=torch.device("cpu"),
                       decoder=CompiledDecoder(model, backend=failing_backend))
    prompt = torch.randint(3, 128, (7,))
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0)]), "cpu")
    with caplog.at_level(logging.WARNING, logger="chimera"):
        for bank in (eager, failing):
            bank.prefill(prompt)
        for step in range(3):
            tokens = torch.randint(3, 128, (tree.topology.size,))
            expected, got = eager.score(tokens, tree), failing.score(tokens, tree)
            assert torch.equal(expected.logits, got.logits) and torch.equal(expected.hidden, got.hidden)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "no kernels for this model" in warnings[0].getMessage()
    assert "torch.compile failed" in failing.decoder.describe()


def test_only_plain_vocabulary_heads_are_compiled():
    plain = tiny_model("llama")
    capped = tiny_model("llama")
    capped.config.final_logit_softcapping = 30.0  # logits are no longer lm_head(hidden)
    assert compilable(plain) and not compilable(capped)
    assert SlotVerifier(plain, graphs=False, compiled=True).decoder is not None
    assert SlotVerifier(capped, graphs=False, compiled=True).decoder is None
    assert target.plain_vocab_head(plain) and not target.plain_vocab_head(capped)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_a_padded_prefill_reads_the_prompt_as_an_unpadded_one(family):
    """The padded prefill (replayed per length bucket on a GPU) computes the prompt's states and the last token's
    logits as the exact-length one does; its pads stay out of every later forward's view."""
    model = tiny_model(family)
    exact = SlotBank(model, capacity=64, device=torch.device("cpu"))
    padded = SlotBank(model, capacity=64, device=torch.device("cpu"), padded_prefill=True)
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0)]), "cpu")
    for n in (1, 5, 16, 17):
        prompt = torch.randint(3, 128, (n,))
        expected, got = exact.prefill(prompt), padded.prefill(prompt)
        assert got.hidden.shape == expected.hidden.shape == (n, model.config.hidden_size)
        assert torch.allclose(expected.hidden, got.hidden, atol=1e-5)
        assert torch.allclose(expected.logits, got.logits, atol=1e-5) and got.logits.shape[0] == 1
        assert padded.cache.length == n
        tokens = torch.randint(3, 128, (tree.topology.size,))
        expected, got = exact.score(tokens, tree), padded.score(tokens, tree)
        assert torch.allclose(expected.logits, got.logits, atol=1e-5)



@pytest.mark.parametrize("top", [1, 2, 7, 16, 300, 1187])
def test_warm_up_lengths_meet_every_bucket_and_capacity(top):
    lengths = warm_up_lengths(top)
    assert max(lengths) == top and min(lengths) == 1
    for extra in (0, 256 + 64):  # the prefill's bucket, and a slot capacity (prompt + new tokens + tree)
        wanted = {power_of_two_at_least(n + extra, 1) for n in range(1, top + 1)}
        assert wanted == {power_of_two_at_least(n + extra, 1) for n in lengths}


class EagerCaptures(GraphRunner):
    """A runner that does on a CPU what capturing does to state: runs a function twice (the warm-up) when it first
    meets its key, then runs it for real at each call."""

    def __init__(self):
        super().__init__(graphs=True)

    def capture(self, key, fn, *inputs, warmup: int = 2):
        static = tuple(x.clone() for x in inputs)
        for _ in range(warmup):
            fn(*static)
        self.captured[key] = None

    def run(self, key, fn, *inputs):
        if key not in self.captured:
            self.capture(key, fn, *inputs)
        return fn(*inputs)


def test_capturing_a_compaction_moves_nothing():
    """A compaction run twice is not one run (a slot moved twice carries another's keys, a length grown twice is
    wrong), so its capture's warm-up runs must change nothing: the first real keep, captured then, keeps exactly
    what an eager one does."""
    model = tiny_model("llama")
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 1, 0)]), "cpu")
    path = torch.tensor([0, 2, 3, 5])  # slot 1 <- 2, 2 <- 3, 3 <- 5: run twice, slot 1 would get node 3's keys
    banks = []
    compiled = CompiledDecoder(model, backend="aot_eager")  # its compaction is compiled too (SlotBank.move)
    for runner, counted, decoder in ((None, False, None), (EagerCaptures(), False, None),
                                     (EagerCaptures(), True, None), (EagerCaptures(), True, compiled)):
        bank = SlotBank(model, capacity=64, device=torch.device("cpu"), runner=runner, decoder=decoder)
        bank.prefill(torch.arange(3, 10))
        bank.score(torch.arange(20, 20 + tree.topology.size), tree)
        if counted:
            bank.keep_counted(path, torch.tensor(4), tree)
        else:
            bank.keep(path, tree)
            bank.prefix.add_(4)
        banks.append(bank)
    for bank in banks[1:]:
        assert int(bank.prefix) == int(banks[0].prefix) == 11
        for mine, reference in zip(bank.cache.layers, banks[0].cache.layers):
            assert torch.equal(mine.keys[:, :, :11], reference.keys[:, :, :11])
    assert isinstance(banks[-1].move, Compiled) and banks[-1].move.failure is None


def test_one_compiled_decoder_per_model_and_each_shape_announced_once(caplog):
    model = tiny_model("llama")
    shared = CompiledDecoder.shared(model, backend="aot_eager")
    assert CompiledDecoder.shared(model, backend="aot_eager") is shared  # every decoder replays what one compiled
    assert CompiledDecoder.shared(model, backend="eager") is not shared
    assert CompiledDecoder.shared(tiny_model("llama"), backend="aot_eager") is not shared
    with caplog.at_level(logging.INFO, logger="chimera"):
        for shape in ("1-token trees", "1-token trees", "64-token trees"):
            with shared.announce(shape):
                pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling")]
    assert len(lines) == 2 and "1-token" in lines[0] and "64-token" in lines[1]


def test_paths_of_every_length_move_through_one_compilation():
    """The compaction's path length is compiled as a symbol: trees of every depth keep their paths through one
    compilation (compiled per length, the first calibration on an H100 spent 14-16 s on each of six), and move what
    the uncompiled compaction moves."""
    model = tiny_model("llama")
    counter = CompileCounter()  # the compaction's compilations only: nothing here runs the compiled decoder
    compiled = SlotBank(model, capacity=64, device=torch.device("cpu"), decoder=CompiledDecoder(model, backend=counter))
    eager = SlotBank(model, capacity=64, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for bank in (compiled, eager):
        bank.prefill(torch.arange(3, 10))
    with torch.inference_mode():  # every slot holds distinct values, so a slot moved wrong shows
        for mine, reference in zip(compiled.cache.layers, eager.cache.layers):
            for tensor in ("keys", "values"):
                values = torch.randn(getattr(mine, tensor).shape, generator=generator)
                getattr(mine, tensor).copy_(values)
                getattr(reference, tensor).copy_(values)
    for depth in range(1, 9):
        tree = TreeBuffers.build(TreeTopology.from_paths([(0,) * k for k in range(1, depth + 1)]), "cpu")
        nodes = torch.randperm(24, generator=generator)[:depth] + 1
        path = torch.cat([torch.zeros(1, dtype=torch.long), nodes.sort().values])
        for bank in (compiled, eager):
            bank.keep(path, tree)
        for mine, reference in zip(compiled.cache.layers, eager.cache.layers):
            assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)
    assert compiled.move.failure is None and counter.frame_count == 1


def test_slot_banks_of_every_capacity_share_one_compaction_and_its_one_line(caplog):
    """Every slot bank over a model compacts through its compiled decoder's one compaction: banks of other
    capacities (a bench's prompts, a calibration's candidates) neither compile it again nor print another
    "compiling" line, and each keeps what an uncompiled bank keeps."""
    model = tiny_model("llama")
    counter = CompileCounter()
    decoder = CompiledDecoder(model, backend=counter)
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 1, 0)]), "cpu")
    path = torch.tensor([0, 2, 3, 5])
    frames = []  # compilations (the base forward's and the compaction's) after each capacity
    with caplog.at_level(logging.INFO, logger="chimera"):
        for capacity in (64, 128, 256):
            banks = [SlotBank(model, capacity=capacity, device=torch.device("cpu"), runner=EagerCaptures(),
                              decoder=compiled) for compiled in (decoder, None)]
            for bank in banks:
                bank.prefill(torch.arange(3, 10))
                bank.score(torch.arange(20, 20 + tree.topology.size), tree)
                bank.keep(path, tree)
            assert banks[0].move is decoder.compaction
            for mine, reference in zip(banks[0].cache.layers, banks[1].cache.layers):
                assert torch.equal(mine.keys[:, :, :11], reference.keys[:, :, :11])
            frames.append(counter.frame_count)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling the KV compaction")]
    assert len(lines) == 1
    assert decoder.compaction.failure is None and frames == [2, 2, 2]  # the forward and the compaction, once each
