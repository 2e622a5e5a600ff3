"""Grouped-query attention without copied keys (chimera/attention.py): the same forwards as transformers' SDPA,
on the verifier's copy only."""

import pytest
import torch

from chimera import attention, cache as kv, target
from chimera.drafters import resolve_drafter
from chimera.generate import SpeculativeDecoder
from chimera.tree import TreeBuffers, TreeTopology, tree_attention_mask
from chimera.verifier import GrowingVerifier
from conftest import FAMILIES, tiny_model


def tree_forward(model, prompt, tokens, tree):
    cache = kv.new_cache()
    target.forward(model, cache, prompt)
    mask = tree_attention_mask(prompt.numel(), tree.ancestors, model.dtype)
    return target.forward(model, cache, tokens, prompt.numel() + tree.depths, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_verifying_model_scores_a_tree_bit_for_bit_like_sdpa(family):
    model = tiny_model(family)
    twin = attention.verifying_model(model)
    assert twin is not model and twin.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"  # the user's model is left as it was
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters()))
    assert attention.verifying_model(model) is twin  # one per model
    tree = TreeBuffers.build(TreeTopology((-1, 0, 0, 1, 2), (0, 0, 1, 0, 0)), "cpu")
    gen = torch.Generator().manual_seed(1)
    prompt, tokens = torch.randint(3, 128, (40,), generator=gen), torch.randint(3, 128, (5,), generator=gen)
    ours, theirs = tree_forward(twin, prompt, tokens, tree), tree_forward(model, prompt, tokens, tree)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.hidden, theirs.hidden)


def test_models_it_does_not_serve_are_used_as_they_are():
    full_heads = tiny_model("llama", num_key_value_heads=4)  # no grouping: nothing to save
    assert attention.verifying_model(full_heads) is full_heads
    eager = tiny_model("llama", attn="eager")  # the user's choice of attention is kept
    assert attention.verifying_model(eager) is eager
    grouped = tiny_model("llama")
    assert GrowingVerifier(grouped).model is attention.verifying_model(grouped) is not grouped
    elsewhere = tiny_model("llama").to("meta")  # not a CPU: a GPU keeps transformers' path (measured faster there)
    assert attention.verifying_model(elsewhere) is elsewhere
    old_style = tiny_model("llama")
    old_style._supports_attention_backend = False  # a model that does not call transformers' attention interface
    assert attention.verifying_model(old_style) is old_style


def test_decoding_with_it_equals_generate_and_leaves_generate_alone(default_model):
    tokenizer = default_model[1]
    model = tiny_model("qwen2", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    prompt = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    before = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    decoder = SpeculativeDecoder(model, tokenizer, resolve_drafter("random", model), tree="small", adaptive=False)
    assert decoder.verifier.model.config._attn_implementation == attention.NAME
    ours = decoder.generate(input_ids=prompt[0].tolist(), max_new_tokens=24, raw=True)
    after = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    assert torch.equal(before, after)
    assert ours.token_ids == before[0, 12:].tolist()
    assert decoder.tree.topology.size > 1 and ours.plain_steps == 0  # every step verified a tree
