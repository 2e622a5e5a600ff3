"""Exactness of speculative greedy decoding on the real default model in float32."""

import pytest
import torch

from chimera import SpeculativeDecoder
from chimera.drafters import resolve_drafter, shipped_drafter_path
from chimera.errors import ChimeraError
from chimera.verifier import SlotVerifier
from conftest import CHAT_PROMPTS

PROMPTS = CHAT_PROMPTS
MAX_NEW = 128


@pytest.fixture(scope="module")
def references(default_model):
    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer)
    refs = []
    for prompt in PROMPTS:
        ids = torch.tensor([decoder.prepare(prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW)
        refs.append(out[0, ids.shape[1]:].tolist())
    return refs


def run_all(decoder):
    results = [decoder.generate(prompt, max_new_tokens=MAX_NEW) for prompt in PROMPTS]
    for r in results:
        assert sum(r.accepted) == r.new_tokens and len(r.accepted) == r.steps
    tau = sum(r.new_tokens for r in results) / sum(r.steps for r in results)
    return results, tau


def test_random_drafter_is_exact(default_model, references):
    model, tokenizer = default_model
    results, tau = run_all(SpeculativeDecoder(model, tokenizer, resolve_drafter("random", model), tree="chain4"))
    for result, ref in zip(results, references):
        assert result.token_ids == ref
    assert tau < 1.5  # an untrained drafter is rarely right


def test_shipped_drafter_is_exact_and_accepts_long_paths(default_model, references):
    model, tokenizer = default_model
    assert shipped_drafter_path(model) is not None
    results, tau = run_all(SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="small",
                                              adaptive=False))
    for result, ref in zip(results, references):
        assert result.token_ids == ref
    assert tau > 1.5
    assert max(max(r.accepted) for r in results) >= 4


def test_slot_cache_decoding_is_exact_with_a_large_tree(default_model, references):
    """The GPU's verification path (fixed-capacity cache, the forward CUDA graphs capture), run eagerly here."""
    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="24")
    decoder.verifier = SlotVerifier(model, graphs=False)
    results = [decoder.generate(prompt, max_new_tokens=MAX_NEW) for prompt in PROMPTS[:4]]
    for result, ref in zip(results, references):
        assert result.token_ids == ref
    with pytest.raises(ChimeraError, match="one at a time"):  # a second generation ends the first one's session
        first, second = iter(decoder.stream(PROMPTS[0])), iter(decoder.stream(PROMPTS[1]))
        next(first), next(second), list(first)


@pytest.mark.parametrize("max_new", [1, 2, 7, 33])
def test_budget_ending_inside_an_accepted_path(default_model, references, max_new):
    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="small")
    result = decoder.generate(PROMPTS[2], max_new_tokens=max_new)
    assert result.token_ids == references[2][:max_new] and result.finish_reason == "length"


def test_stop_string_inside_an_accepted_path_matches_plain_decoding(default_model):
    model, tokenizer = default_model
    plain = SpeculativeDecoder(model, tokenizer)
    spec = SpeculativeDecoder(model, tokenizer, resolve_drafter("auto", model), tree="small")
    for prompt, stop in [(PROMPTS[5], ["\n"]), (PROMPTS[8], [" the", "."]), (PROMPTS[1], ["zzz-never"])]:
        a = plain.generate(prompt, max_new_tokens=60, stop=stop)
        b = spec.generate(prompt, max_new_tokens=60, stop=stop)
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)


def test_drafter_option_errors(capsys, tmp_path):
    from chimera.cli import main

    assert main(["generate", "hi", "--drafter", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
