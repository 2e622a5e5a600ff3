"""The tree forward scores every node exactly as sequential decoding of its path would, on four families."""

import random

import pytest
import torch

from chimera import cache as kv, target
from chimera.tree import TreeBuffers, TreeTopology, tree_attention_mask
from conftest import FAMILIES, tiny_model


def random_topology(rng: random.Random, size: int, max_depth: int, max_width: int) -> TreeTopology:
    paths = [()]
    children = {(): 0}
    while len(paths) < size:
        parent = rng.choice([p for p in paths if len(p) < max_depth and children[p] < max_width])
        child = parent + (children[parent],)
        children[parent] += 1
        children[child] = 0
        paths.append(child)
    return TreeTopology.from_paths(paths[1:])


def sequential_logits(model, prefix, path_tokens):
    cache = kv.new_cache()
    out = target.forward(model, cache, prefix)
    for token in path_tokens:
        out = target.forward(model, cache, token.reshape(1))
    return out


SHAPES = [(6, 5, 1), (12, 3, 4), (20, 6, 3), (30, 4, 5)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_logits_equal_sequential(family, attn):
    model = tiny_model(family, attn=attn)
    rng = random.Random(hash((family, attn)) % 1000)
    for size, depth, width in SHAPES:
        topology = random_topology(rng, size, depth, width)
        tree = TreeBuffers.build(topology, "cpu")
        prefix = torch.randint(3, 128, (rng.randint(1, 20),))
        tokens = torch.randint(3, 128, (topology.size,))
        cache = kv.new_cache()
        target.forward(model, cache, prefix)
        out = target.forward_tree(model, cache, tokens, tree.depths, tree.ancestors)
        assert cache.get_seq_length() == prefix.numel() + topology.size
        for node in range(topology.size):
            path = tree.ancestors[node].nonzero().squeeze(-1)
            ref = sequential_logits(model, prefix, tokens[path])
            torch.testing.assert_close(out.logits[node], ref.logits[-1], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.hidden[node], ref.hidden[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_compaction_then_next_forward_equals_fresh_forward(family):
    model = tiny_model(family)
    rng = random.Random(7)
    for size, depth, width in SHAPES:
        topology = random_topology(rng, size, depth, width)
        tree = TreeBuffers.build(topology, "cpu")
        prefix = torch.randint(3, 128, (rng.randint(2, 15),))
        tokens = torch.randint(3, 128, (topology.size,))
        cache = kv.new_cache()
        target.forward(model, cache, prefix)
        target.forward_tree(model, cache, tokens, tree.depths, tree.ancestors)
        node = rng.randrange(topology.size)
        path = tree.ancestors[node].nonzero().squeeze(-1)
        kv.keep_path(cache, prefix.numel(), path)
        assert cache.get_seq_length() == prefix.numel() + path.numel()
        nxt = torch.randint(3, 128, (3,))
        after = target.forward(model, cache, nxt)
        fresh = target.forward(model, kv.new_cache(), torch.cat([prefix, tokens[path], nxt]))
        torch.testing.assert_close(after.logits, fresh.logits[-3:], atol=1e-5, rtol=0)


def test_topology_from_paths_is_breadth_first_and_validated():
    topo = TreeTopology.from_paths([(0, 0), (0,), (1,), (0, 1), (0, 0, 0)])
    assert topo.parents == (-1, 0, 0, 1, 1, 3)
    assert topo.ranks == (0, 0, 1, 0, 1, 0)
    assert topo.depths == (0, 1, 1, 2, 2, 3)
    assert [list(r) for r in topo.levels] == [[0], [1, 2], [3, 4], [5]]
    with pytest.raises(ValueError):
        TreeTopology.from_paths([(0, 0)])  # missing prefix
    with pytest.raises(ValueError):
        TreeTopology((-1, 0, 0), (0, 1, 1))  # repeated rank


def test_tree_mask_allows_prefix_and_ancestors_only():
    topo = TreeTopology.from_paths([(0,), (1,), (0, 0)])
    mask = tree_attention_mask(3, topo.ancestor_matrix(), torch.float32)[0, 0]
    allowed = mask == 0
    assert allowed[:, :3].all()
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed[:, 3:], expected)
    assert (mask[~allowed] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", FAMILIES)
def test_slot_cache_scores_trees_and_keeps_paths_like_the_growing_cache(family, compiled):
    """The fixed-capacity cache (what CUDA graphs replay) gives the same logits as sequential decoding, step
    after step, with junk from earlier generations and trees left in its unused slots; so does the decoder
    through torch.compile (traced by Dynamo as on a GPU; the aot_eager backend stands in for inductor's kernels)."""
    from chimera.compiled import CompiledDecoder
    from chimera.verifier import SlotBank

    model = tiny_model(family)
    rng = random.Random(11)
    decoder = CompiledDecoder(model, backend="aot_eager") if compiled else None
    bank = SlotBank(model, capacity=128, device=torch.device("cpu"), decoder=decoder)
    for generation, (size, depth, width) in enumerate(SHAPES):
        topology = random_topology(rng, size, depth, width)
        tree = TreeBuffers.build(topology, "cpu")
        sequence = torch.randint(3, 128, (rng.randint(1, 20),))
        out = bank.prefill(sequence)
        fresh = target.forward(model, kv.new_cache(), sequence)
        torch.testing.assert_close(out.logits, fresh.logits[-1:], atol=1e-5, rtol=0)  # the last only
        for step in range(3):
            tokens = torch.randint(3, 128, (topology.size,))
            out = bank.score(tokens, tree)
            for node in range(topology.size):
                path = tree.ancestors[node].nonzero().squeeze(-1)
                ref = sequential_logits(model, sequence, tokens[path])
                torch.testing.assert_close(out.logits[node], ref.logits[-1], atol=1e-5, rtol=0)
            path = tree.ancestors[rng.randrange(topology.size)].nonzero().squeeze(-1)
            padded = torch.cat([path, torch.full((topology.max_depth + 1 - path.numel(),), topology.size - 1)])
            bank.keep(padded if generation % 2 else path, tree)  # what the graph moves, or just the path
            bank.set_length(sequence.numel() + path.numel())
            sequence = torch.cat([sequence, tokens[path]])
    if compiled:  # it really ran compiled: Dynamo captured graphs and nothing fell back
        assert decoder.failure is None and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_chain_is_kept_by_cutting_the_cache(family):
    """GrowingSession.keep cuts the cache after a chain (its accepted nodes already follow the prefix): the next
    forward sees exactly what a fresh one over the kept tokens sees."""
    from chimera.verifier import GrowingSession

    assert TreeTopology.chain(3).is_chain and TreeTopology.chain(0).is_chain
    assert not TreeTopology.from_paths([(0,), (1,)]).is_chain
    assert not TreeTopology.from_paths([(0,), (0, 0), (1,)]).is_chain
    model = tiny_model(family)
    tree = TreeBuffers.build(TreeTopology.chain(4), "cpu")
    prefix, tokens, nxt = torch.randint(3, 128, (9,)), torch.randint(3, 128, (5,)), torch.randint(3, 128, (2,))
    for length in (1, 3, 5):
        session = GrowingSession(model)
        session.prefill(prefix)
        session.score(tokens, tree)
        session.keep(torch.arange(5), length, tree)
        assert session.length == prefix.numel() + length
        after = target.forward(model, session.cache, nxt)
        fresh = target.forward(model, kv.new_cache(), torch.cat([prefix, tokens[:length], nxt]))
        torch.testing.assert_close(after.logits, fresh.logits[-2:], atol=1e-5, rtol=0)
