"""Grouped-query attention without copied keys (chimera/attention.py): the same forwards as transformers' SDPA,
on the verifier's copy only."""

import pytest
import torch

from chimera import attention, cache as kv, target
from chimera.cache_argument import cache_kwargs
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


@pytest.mark.parametrize("function", ["batch_attention", "batch_attention_folded", "batch_attention_heads"])
@pytest.mark.parametrize("queries", [1, 4], ids=["a plain step", "a drafted chain"])
def test_the_batchs_step_attends_like_repeated_keys(queries, function):
    """The batch's step on a GPU: grouped SDPA (or, for a chain, its query heads folded into queries of their key
    head, or its query tokens read as query heads) over keys and values not repeated, each row masked to its own
    length and its chain causal."""
    import types

    gen = torch.Generator().manual_seed(5)
    rows, heads, kv_heads, slots, size = 3, 6, 2, 20, 8
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads)
    query = torch.randn(rows, heads, queries, size, generator=gen)
    key, value = torch.randn(2, rows, kv_heads, slots, size, generator=gen)
    positions = torch.tensor([4, 15, 11])[:, None] + torch.arange(queries)
    mask = torch.where(torch.arange(slots) <= positions[:, :, None], 0.0, float("-inf"))[:, None]
    repeated = [t.repeat_interleave(heads // kv_heads, 1) for t in (key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=mask, scale=0.3)
    out, _ = getattr(attention, function)(module, query, key, value, mask, scaling=0.3)
    assert out.shape == (rows, queries, heads, size)
    torch.testing.assert_close(out, expected.transpose(1, 2))


@pytest.mark.parametrize("chain_attention", ["grouped", "folded", "heads"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_batch_twin_steps_rows_like_the_model(family, chain_attention, monkeypatch):
    """``batch_attention`` (or ``batch_attention_folded``, ``batch_attention_heads``) on a twin (a GPU's, built here on
    a CPU): one token a row, or a chain a row, each row masked to its own length, the same logits as the model's own
    SDPA; a prefill goes to grouped_attention."""
    model = tiny_model(family)
    name = attention.CHAIN_ATTENTION[chain_attention]
    twin = attention._twin(model, name)
    assert twin is not model and twin.config._attn_implementation == name
    assert model.config._attn_implementation == "sdpa"
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(3, 128, (3, 16), generator=gen)
    mask = torch.zeros(3, 1, 16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    caches = [kv.new_cache(), kv.new_cache()]
    outs = [m(input_ids=tokens, attention_mask=mask, use_cache=True, **cache_kwargs(m, c))
            for m, c in zip((model, twin), caches)]
    torch.testing.assert_close(outs[0].logits, outs[1].logits)  # a prefill
    queries = []  # the query tokens a row of every step attention, by the route the twin's chains take
    for route in ("_grouped_sdpa", "_folded_sdpa", "_heads_sdpa"):
        monkeypatch.setattr(attention, route, lambda query, *args, original=getattr(attention, route):
                            queries.append((original.__name__, query.shape[2])) or original(query, *args))
    step = torch.randint(3, 128, (3, 1), generator=gen)
    lengths = torch.tensor([5, 16, 9])  # each row sees its first lengths slots and the new token
    step_mask = torch.where(torch.arange(17)[None, :] <= lengths[:, None], 0.0, float("-inf"))[:, None, None]
    step_mask[:, :, :, 16] = 0.0
    logits = [m(input_ids=step, attention_mask=step_mask, position_ids=lengths[:, None], **cache_kwargs(m, c)).logits
              for m, c in zip((model, twin), caches)]
    torch.testing.assert_close(logits[0], logits[1])
    # the step, every layer, through grouped SDPA
    assert queries.count(("_grouped_sdpa", 1)) == model.config.num_hidden_layers
    chain = torch.randint(3, 128, (3, 4), generator=gen)  # a drafted chain a row, causal, after the step's token
    positions = lengths[:, None] + 1 + torch.arange(4)
    chain_mask = torch.where(torch.arange(21) <= positions[:, :, None], 0.0, float("-inf"))[:, None]
    chain_mask[:, :, :, 16] = 0.0  # the step's token, in slot 16 of both caches
    chain_mask[:, :, :, 17:] = torch.where(torch.ones(4, 4, dtype=torch.bool).tril(), 0.0, float("-inf"))
    logits = [m(input_ids=chain, attention_mask=chain_mask, position_ids=positions, **cache_kwargs(m, c)).logits
              for m, c in zip((model, twin), caches)]
    torch.testing.assert_close(logits[0], logits[1])
    chains = {"grouped": "_grouped_sdpa", "folded": "_folded_sdpa", "heads": "_heads_sdpa"}[chain_attention]
    assert queries.count((chains, 4)) == model.config.num_hidden_layers
    # a CPU: the verifier's own path, whichever the chains' attention
    assert attention.batch_model(model, chain_attention) is attention.verifying_model(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_verifiers_folded_twin_scores_steps_and_trees_like_the_model(family, monkeypatch):
    """``verifier_attention_folded`` (a GPU's lone verifier, candidate; its twin built here on a CPU): a prompt, a
    tree over it and a one-token step give the model's own logits and hidden states; the tree's and the prompt's
    query heads are folded onto their key heads, the step goes through grouped SDPA, every layer."""
    model = tiny_model(family)
    twin = attention._twin(model, attention.VERIFIER_FOLDED_NAME)
    assert twin is not model and twin.config._attn_implementation == attention.VERIFIER_FOLDED_NAME
    assert model.config._attn_implementation == "sdpa"
    routes = []
    for route in ("_grouped_sdpa", "_folded_sdpa"):
        monkeypatch.setattr(attention, route, lambda query, *args, original=getattr(attention, route):
                            routes.append((original.__name__, query.shape[2])) or original(query, *args))
    tree = TreeBuffers.build(TreeTopology((-1, 0, 0, 1, 2), (0, 0, 1, 0, 0)), "cpu")
    gen = torch.Generator().manual_seed(7)
    prompt, tokens = torch.randint(3, 128, (40,), generator=gen), torch.randint(3, 128, (5,), generator=gen)
    ours, theirs = tree_forward(twin, prompt, tokens, tree), tree_forward(model, prompt, tokens, tree)
    torch.testing.assert_close(ours.logits, theirs.logits)
    torch.testing.assert_close(ours.hidden, theirs.hidden)
    layers = model.config.num_hidden_layers
    assert routes.count(("_folded_sdpa", 5)) == layers  # the tree (the prompt, unmasked here, is transformers')
    step = torch.randint(3, 128, (1,), generator=gen)
    single = tree_forward(twin, prompt, step, TreeBuffers.build(TreeTopology((-1,), (0,)), "cpu"))
    alone = tree_forward(model, prompt, step, TreeBuffers.build(TreeTopology((-1,), (0,)), "cpu"))
    torch.testing.assert_close(single.logits, alone.logits)
    assert routes.count(("_grouped_sdpa", 1)) == layers


def test_the_verifier_keeps_transformers_attention_unless_asked_and_on_a_cpu():
    """``verifier_model``: "repeated" is the model's own route on a GPU (here: the CPU's verifying twin), and every
    route on a CPU is the CPU's verifying twin; an unknown route is refused."""
    model = tiny_model("llama")
    for route in attention.VERIFIER_ATTENTION:
        assert attention.verifier_model(model, route) is attention.verifying_model(model)
    elsewhere = tiny_model("llama").to("meta")  # neither a CPU nor a GPU: the model as it is
    assert all(attention.verifier_model(elsewhere, route) is elsewhere for route in attention.VERIFIER_ATTENTION)
    with pytest.raises(KeyError):
        attention.verifier_model(model, "copied")


@pytest.mark.parametrize("route", ["grouped", "folded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_through_a_gpu_route_of_the_verifier_equals_generate(family, route, default_model, monkeypatch):
    """``SpeculativeDecoder(attention_route=...)``'s slot verifier as a GPU builds it (the decoder's own
    ``new_verifier`` call taken to a slot verifier without graphs, its twin made here on a CPU: ``applies`` answers
    as on a GPU), trees and plain prompts verified through the route's attention: greedy ``generate``'s tokens, with
    the route's functions called."""
    from chimera import verifier
    from conftest import assert_decodes_like_generate
    from test_drafter import perturbed_drafter

    _, tokenizer = default_model
    model = tiny_model(family)
    on_cpu = attention.applies
    monkeypatch.setattr(attention, "applies", lambda m, device_type="cpu": on_cpu(m, "cpu"))  # a "GPU" here
    monkeypatch.setattr("chimera.generate.new_verifier", lambda model, device, cuda_graphs, packed_linears,
                        head_route, compiled, features, attention_route:
                        verifier.SlotVerifier(model, graphs=False, features=features, attention_route=attention_route))
    calls = []
    for name in ("_grouped_sdpa", "_folded_sdpa"):
        monkeypatch.setattr(attention, name, lambda query, *args, original=getattr(attention, name):
                            calls.append(original.__name__) or original(query, *args))
    decoder = SpeculativeDecoder(model, tokenizer, perturbed_drafter(model, heads=5), tree="small", adaptive=False,
                                 attention_route=route)
    assert decoder.verifier.model.config._attn_implementation == attention.VERIFIER_ATTENTION[route]
    assert_decodes_like_generate(decoder, model)
    assert decoder.tree.topology.size > 1 and calls
    assert ("_folded_sdpa" in calls) == (route == "folded")  # "grouped": trees over STEP_QUERIES nodes repeat


def test_an_unknown_verifier_route_is_refused(default_model):
    from chimera.errors import ChimeraError

    _, tokenizer = default_model
    with pytest.raises(ChimeraError, match="attention_route must be one of auto, repeated, grouped, folded"):
        SpeculativeDecoder(tiny_model("llama"), tokenizer, attention_route="copied")


def test_the_decoder_folds_its_attention_where_its_forward_is_compiled(default_model):
    """``attention_route="auto"`` (the default): "folded" with a compiled forward (bfloat16's default, where an H200
    measured it faster), transformers' own otherwise (float32's default); a route asked for is kept either way."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    assert SpeculativeDecoder(model, tokenizer).attention_route == "repeated"  # float32: uncompiled by default
    assert SpeculativeDecoder(model, tokenizer, compile=True).attention_route == "folded"
    assert SpeculativeDecoder(model, tokenizer, compile=True, attention_route="grouped").attention_route == "grouped"
    assert SpeculativeDecoder(model, tokenizer, attention_route="folded").attention_route == "folded"
    assert [attention.verifier_route(route, compiled) for route in ("auto", "repeated") for compiled in (True, False)] \
        == ["folded", "repeated", "repeated", "repeated"]
