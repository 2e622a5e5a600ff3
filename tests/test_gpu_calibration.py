"""The GPU's calibration: the search decodes with each candidate and keeps the fastest (plain decoding too), its
choice is cached and re-measured when the file is bad, and every choice it can make decodes exactly what generate
does. Run here on a CPU: the search and the decoders are the same code, only ``applies`` asks for a GPU."""

import json
import logging

import pytest
import torch

from chimera import SpeculativeDecoder, gpu_calibration
from chimera.gpu_calibration import TreeCalibration
from chimera.tree import DynamicTree, get_topology
from conftest import FAMILIES, assert_decodes_like_generate, tiny_model
from test_drafter import counted_drafter

CPU = torch.device("cpu")  # counted_drafter has no acceptance profile, so the CPU's own calibration leaves it alone


def rates(plain: float, table):
    """A stand-in for decode_rate: tokens/s from ``table(size, depth, vocab)``, and the calls it got."""
    calls = []

    def decode_rate(model, tokenizer, drafter, tree, vocab, options, prompts, new_tokens):
        calls.append((tree, vocab))
        if drafter is None:
            return plain, 1.0
        _, size, beam, depth = tree.split("-")
        return table(int(size), int(depth), vocab), 2.0

    return decode_rate, calls


def test_the_search_keeps_the_fastest_choice_one_at_a_time(monkeypatch):
    model = tiny_model("llama")
    drafter = counted_drafter(model)
    # depth 4 is best at 64 nodes and the whole vocabulary; at depth 4, 64 draft tokens; then 32 nodes
    table = lambda size, depth, vocab: 100 + 10 * (depth == 4) + 5 * (vocab == 64) + 3 * (size == 32)  # noqa: E731
    fake, calls = rates(90.0, table)
    monkeypatch.setattr(gpu_calibration, "decode_rate", fake)
    got = gpu_calibration.measure(model, None, drafter, {}, {}, progress=False, depths=(3, 4, 5, 8),
                                  vocabs=(None, 64, 1 << 20), sizes=(32, 64))
    assert got.drafts and got.tree == "dynamic-32-8-4" and got.draft_vocab == 64
    assert isinstance(get_topology(got.tree, drafter), DynamicTree)
    assert get_topology(got.tree, drafter) == DynamicTree(size=32, depth=4, beam=8)  # the name reads back as the tree
    assert got.tokens_per_s["plain"] == 90.0 and got.tokens_per_s["dynamic-32-8-4/64"] == 118
    # depth 8 is past the drafter's 5 heads and a vocabulary past the model's is no draft vocabulary: not tried;
    # every candidate decoded once (plain, 3 depths, 1 more vocabulary, 1 more size)
    assert len(calls) == len(set(calls)) == 6
    assert ("dynamic-64-8-8", None) not in calls and all(v != 1 << 20 for _, v in calls)
    assert "118.0 tokens/s" in got.reason and "90.0 plain" in got.reason


def test_plain_decoding_wins_where_no_tree_is_faster(monkeypatch):
    model = tiny_model("llama")
    drafter = counted_drafter(model)
    fake, _ = rates(200.0, lambda size, depth, vocab: 150.0)
    monkeypatch.setattr(gpu_calibration, "decode_rate", fake)
    got = gpu_calibration.measure(model, None, drafter, {}, {}, progress=False, depths=(3,), vocabs=(None,),
                                  sizes=(64,))
    assert not got.drafts and got.tree == "" and "no tree beats plain decoding" in got.reason


def test_a_candidate_that_runs_out_of_memory_is_left_out_with_a_warning(monkeypatch, caplog):
    model = tiny_model("llama")
    drafter = counted_drafter(model)
    fake, _ = rates(90.0, lambda size, depth, vocab: 100.0 + size)  # the more nodes the better, if they fit

    def decode_rate(model, tokenizer, drafter, tree, vocab, *args):
        if tree == "dynamic-128-8-3":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return fake(model, tokenizer, drafter, tree, vocab, *args)

    monkeypatch.setattr(gpu_calibration, "decode_rate", decode_rate)
    with caplog.at_level(logging.WARNING, logger="chimera"):
        got = gpu_calibration.measure(model, None, drafter, {}, {}, progress=False, depths=(3,), vocabs=(None,),
                                      sizes=(32, 64, 128))
    assert got.tree == "dynamic-64-8-3" and got.tokens_per_s["dynamic-128-8-3/all"] == 0.0
    assert any("did not fit" in r.getMessage() for r in caplog.records)


def test_a_real_search_measures_what_it_chose(default_model):
    _, tokenizer = default_model
    model = tiny_model("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    drafter = counted_drafter(model, heads=3)
    got = gpu_calibration.measure(model, tokenizer, drafter, {}, gpu_calibration.decoder_options(), progress=False,
                                  depths=(2, 3), vocabs=(None, 4096), sizes=(8, 64), prompts=("Hi!", "Count to 3."),
                                  new_tokens=6)
    assert got.tokens_per_s["plain"] > 0 and got.seconds > 0
    spec = {name: rate for name, rate in got.tokens_per_s.items() if name != "plain"}
    assert set(got.tau) == set(spec) and all(t >= 1 for t in got.tau.values())
    best = max(spec.values())
    if got.drafts:  # the choice is the fastest candidate of its last coordinate, and it beat plain decoding
        assert got.tokens_per_s[f"{got.tree}/{got.draft_vocab or 'all'}"] == best > got.tokens_per_s["plain"]
    else:
        assert best <= got.tokens_per_s["plain"]


def test_it_measures_once_then_reads_the_cache_and_remeasures_a_bad_file(cache, monkeypatch, caplog):
    model = tiny_model("llama")
    drafter = counted_drafter(model)
    options = gpu_calibration.decoder_options()
    made = TreeCalibration({}, tree="dynamic-16-8-3", draft_vocab=None, reason="test")
    monkeypatch.setattr(gpu_calibration, "measure", lambda model, tokenizer, drafter, key, *a, **k:
                        TreeCalibration(key, made.tree, made.draft_vocab, reason=made.reason))
    first = gpu_calibration.load_or_measure(model, None, drafter, CPU, options, progress=False)
    assert first.tree == made.tree and first.key["card"] == "cpu" and first.key["options"]["compile"] == "auto"
    path = gpu_calibration.calibration.cache_path(first.key)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    with monkeypatch.context() as m:
        m.setattr(gpu_calibration, "measure", no_measuring)
        assert gpu_calibration.load_or_measure(model, None, drafter, CPU, options, progress=False) == first
    # other switches are another measurement
    assert gpu_calibration.machine_key(model, drafter, CPU, {**options, "compile": False}) != first.key
    path.write_bytes(b'{"key": 1, "tree": []}')
    with caplog.at_level(logging.WARNING, logger="chimera"):
        again = gpu_calibration.load_or_measure(model, None, drafter, CPU, options, progress=False)
    assert again == first and len([r for r in caplog.records if "measuring again" in r.getMessage()]) == 1
    assert json.loads(path.read_text())["tree"] == made.tree  # the bad file was replaced


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("choice", [("", None), ("dynamic-16-8-3", None), ("dynamic-8-4-2", 64)])
def test_every_choice_decodes_exactly(family, choice, default_model, monkeypatch):
    _, tokenizer = default_model
    model = tiny_model(family)
    drafter = counted_drafter(model)
    tree, vocab = choice
    made = TreeCalibration({}, tree=tree, draft_vocab=vocab, reason="forced")
    monkeypatch.setattr(gpu_calibration, "applies", lambda *args: True)  # as on a GPU
    monkeypatch.setattr(gpu_calibration, "load_or_measure", lambda *args, **kwargs: made)
    decoder = SpeculativeDecoder(model, tokenizer, drafter)
    assert decoder.calibration is made and (decoder.drafter is None) == (not tree)
    if tree:
        assert decoder.tree.topology == get_topology(tree, drafter) and decoder.draft_vocab == vocab
    assert_decodes_like_generate(decoder, model)


def test_explicit_options_skip_it():
    model = tiny_model("llama")
    drafter = counted_drafter(model)
    cuda = torch.device("cuda")
    assert gpu_calibration.applies(drafter, cuda, "auto")
    assert not gpu_calibration.applies(drafter, cuda, "dynamic-32")
    assert not gpu_calibration.applies(drafter, CPU, "auto")
    assert not gpu_calibration.applies(None, cuda, "auto")
