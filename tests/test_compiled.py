"""The compiled switch: a compiler that fails leaves decoding on the uncompiled forward, with one warning."""

import logging

import torch

from chimera import base
from chimera.compiled import CompiledDecoder, compilable
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
    assert base.plain_vocab_head(plain) and not base.plain_vocab_head(capped)
