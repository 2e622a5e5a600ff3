"""Calibration: it measures and caches a choice, re-measures a corrupt or stale file, and every choice it can
make decodes exactly what generate does."""

import json
import logging

import pytest
import torch

from chimera import SpeculativeDecoder, calibration, target
from chimera.calibration import Calibration
from conftest import FAMILIES, assert_decodes_like_generate, tiny_model
from test_drafter import counted_drafter, perturbed_drafter

PROFILE = [[0.7, 0.15, 0.05], [0.6, 0.15, 0.05], [0.5, 0.1, 0.05], [0.5, 0.1, 0.05], [0.4, 0.1, 0.05]]


def profiled_drafter(model):
    drafter = counted_drafter(model, heads=5)
    drafter.acceptance_profile = PROFILE
    return drafter


def test_it_measures_once_then_reads_the_cache(cache, default_model, monkeypatch):
    _, tokenizer = default_model
    model = tiny_model("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    drafter = profiled_drafter(model)
    first = calibration.load_or_measure(model, tokenizer, drafter, torch.device("cpu"), progress=False)
    assert first.tree_size == 0 or first.tree_size in calibration.TREE_SIZES
    assert set(first.plain_ms) <= {"stock", "packed"} and first.verify_ms and first.draft_ms
    assert first.plain_tokens_per_s > 0 and first.tau_scale >= 0 and first.reason
    best = max(first.expected_tokens_per_s.values())
    if first.tree_size:  # the best configuration won, and it beat plain decoding
        assert first.expected_tokens_per_s[f"{first.tree_size}/{first.draft_vocab or 'all'}"] == best
        assert "against" in first.reason
        # the vocabulary projection's route: the fastest for a plain step's row and the tree's rows
        assert set(first.head_ms) == set(target.HEAD_ROUTES)
        assert first.head_route == min(first.head_ms, key=first.head_ms.get)
    else:
        assert "no tree beats plain decoding" in first.reason and first.head_route is None
    path = calibration.cache_path(first.key)
    assert path.is_file()

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibration, "measure", no_measuring)
    again = calibration.load_or_measure(model, tokenizer, drafter, torch.device("cpu"), progress=False)
    assert again == first


@pytest.mark.parametrize("content", [b"\x00\xff not json", b"[]", b'{"key": {}}'])
def test_a_corrupt_or_stale_file_is_measured_again_with_one_warning(cache, default_model, monkeypatch, caplog,
                                                                    content):
    _, tokenizer = default_model
    model = tiny_model("llama")
    drafter = profiled_drafter(model)
    key = calibration.machine_key(model, drafter)
    path = calibration.cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    made = Calibration(key, packed_linears=False, tree_size=3, draft_vocab=None, reason="test")
    monkeypatch.setattr(calibration, "measure", lambda *args, **kwargs: made)
    with caplog.at_level(logging.WARNING, logger="chimera"):
        got = calibration.load_or_measure(model, tokenizer, drafter, torch.device("cpu"), progress=False)
    assert got == made
    assert len([r for r in caplog.records if "measuring again" in r.getMessage()]) == 1
    assert json.loads(path.read_text())["tree_size"] == 3  # replaced by the new measurement


def test_a_file_of_another_machine_is_measured_again(cache, default_model, monkeypatch, caplog):
    _, tokenizer = default_model
    model = tiny_model("llama")
    drafter = profiled_drafter(model)
    key = calibration.machine_key(model, drafter)
    calibration.save(Calibration({**key, "processor": "elsewhere"}, False, 2, None), calibration.cache_path(key))
    made = Calibration(key, packed_linears=False, tree_size=4, draft_vocab=None, reason="test")
    monkeypatch.setattr(calibration, "measure", lambda *args, **kwargs: made)
    with caplog.at_level(logging.WARNING, logger="chimera"):
        assert calibration.load_or_measure(model, tokenizer, drafter, torch.device("cpu"), progress=False) == made
    assert any("another machine" in r.getMessage() for r in caplog.records)


def test_explicit_options_skip_calibration():
    model = tiny_model("llama")
    drafter = profiled_drafter(model)
    assert calibration.applies(drafter, torch.device("cpu"), "auto")
    assert not calibration.applies(drafter, torch.device("cpu"), "small")
    assert not calibration.applies(drafter, torch.device("cuda"), "auto")
    assert not calibration.applies(perturbed_drafter(model), torch.device("cpu"), "auto")  # no profile


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("choice", [(0, None, True, None), (2, None, False, "few_rows"), (5, None, True, None),
                                    (4, 64, False, "linear")])
def test_every_choice_decodes_exactly(family, choice, default_model, monkeypatch):
    _, tokenizer = default_model
    model = tiny_model(family)
    drafter = profiled_drafter(model)
    tree_size, vocab, packed, head = choice
    made = Calibration({}, packed_linears=packed, tree_size=tree_size, draft_vocab=vocab, reason="forced",
                       head_route=head)
    monkeypatch.setattr(calibration, "load_or_measure", lambda *args, **kwargs: made)
    decoder = SpeculativeDecoder(model, tokenizer, drafter)
    assert decoder.calibration is made
    assert (decoder.drafter is None) == (tree_size == 0)
    if tree_size:
        assert decoder.tree.topology.size == tree_size and decoder.draft_vocab == vocab
    routes = calibration.linear_routes(model, torch.device("cpu"))
    assert decoder.verifier.head_route == (made.head_route or routes.head)  # the tree's route, else the routes'
    assert_decodes_like_generate(decoder, model)
