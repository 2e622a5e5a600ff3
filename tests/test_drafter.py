"""The Chimera drafter on tiny models: tables, training/inference agreement, persistence, bad directories."""

import json

import numpy as np
import pytest
import torch

from chimera import ChimeraError, SpeculativeDecoder, cache as kv, target
from chimera.drafters import load_any, persist
from chimera.drafters.chimera import ChimeraDrafter, load_drafter, odds_line
from chimera.train.trainer import TrainConfig, train
from chimera.tree import DynamicTree, TreeBuffers, TreeTopology
from chimera.verifier import SlotVerifier
from conftest import FAMILIES, as_on_a_gpu, tiny_model


def perturbed_drafter(model, heads=4):
    drafter = ChimeraDrafter.for_base(model, num_draft_heads=heads)
    for head in drafter.heads:  # heads start as the identity; make them matter
        torch.nn.init.normal_(head.fc2.weight, std=0.2)
    return drafter.eval()


def counted_drafter(model, heads=5):
    """``perturbed_drafter`` that knows its base's token counts (what a draft vocabulary is chosen from)."""
    drafter = perturbed_drafter(model, heads=heads)
    drafter.token_counts = torch.arange(model.config.vocab_size, 0, -1)
    return drafter


def test_trigram_tables_equal_direct_computation():
    drafter = perturbed_drafter(tiny_model("llama"))
    t0, t1, t2 = torch.randint(0, drafter.pad_id + 1, (3, 200))
    torch.testing.assert_close(drafter.trigram_lookup(t0, t1, t2), drafter.trigram(t0, t1, t2), atol=1e-5, rtol=0)
    tables = drafter.trigram_tables()
    assert tables.shape == (3, drafter.pad_id + 1, drafter.config.hidden_size)
    assert torch.count_nonzero(tables[:, drafter.pad_id]) == 0  # the padding token contributes nothing


def test_drafting_without_tables_drafts_the_same_trees():
    """A GPU keeps no trigram tables (their memory grows with the vocabulary) and computes the encoding directly
    (ChimeraDrafter.prepare_inference): the same trees, static and dynamic, as through the tables."""
    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=4)
    drafter.prepare_inference()
    assert drafter.use_tables and drafter._tables is not None  # a CPU keeps them
    tokens = torch.randint(3, 128, (12,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    for topology in (TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]),
                     DynamicTree(size=10, depth=4, beam=3)):
        drafts = []
        for tables in (True, False):
            drafter.use_tables = tables
            tree = TreeBuffers.build(topology, "cpu")
            drafts.append((drafter.propose(drafter.start(tokens[:-1], hidden[:-1]), tokens[-1:], tree), tree.parents))
        assert torch.equal(drafts[0][0], drafts[1][0]) and torch.equal(drafts[0][1], drafts[1][1])


def test_tables_follow_weight_updates():
    drafter = perturbed_drafter(tiny_model("llama"))
    before = drafter.trigram_tables().clone()
    with torch.no_grad():
        drafter.trigram_in.weight.mul_(2)
    assert not torch.allclose(drafter.trigram_tables(), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_drafts_exactly_what_inference_drafts(family):
    """The unrolled training chains see the same attention pattern and inputs as inference drafting."""
    model = tiny_model(family)
    drafter = perturbed_drafter(model)
    L, depth = 24, 4
    tokens = torch.randint(3, 128, (1, L))
    hidden = target.forward(model, kv.new_cache(), tokens[0]).hidden
    with torch.no_grad():
        logits, _ = drafter.unrolled_forward(tokens, hidden[None], depth)
    tree = TreeBuffers.build(TreeTopology.chain(depth), "cpu")
    for root in range(1, L - 1):
        state = drafter.start(tokens[0, :root], hidden[:root])
        proposed = drafter.propose(state, tokens[0, root:root + 1], tree)
        assert proposed[1:].tolist() == [int(logits[k][0, root].argmax()) for k in range(depth)], root


def test_advance_equals_start_over_the_longer_prefix():
    model = tiny_model("llama")
    drafter = perturbed_drafter(model)
    tokens = torch.randint(3, 128, (30,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    grown = drafter.start(tokens[:10], hidden[:10])
    for lo, hi in [(10, 13), (13, 14), (14, 30)]:
        drafter.advance(grown, tokens[lo:hi], hidden[lo:hi])
    fresh = drafter.start(tokens, hidden)
    assert grown.length == fresh.length == 30
    torch.testing.assert_close(grown.keys[:, :30], fresh.keys[:, :30])
    assert torch.equal(grown.history, fresh.history)


def briefly_trained(model, tmp_path, prompts, steps=40, depth=4):
    """Train on the model's own greedy continuations of ``prompts`` so that long paths get accepted."""
    samples = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=48)[0]
        mask = np.array([0] * len(ids) + [1] * (out.numel() - len(ids)), dtype=bool)
        samples.append((out.numpy(), mask))
    cfg = TrainConfig(steps=steps, batch_size=2, max_len=128, roots_per_seq=32, depth=depth, lr=1e-2,
                      warmup_steps=5, heldout_fraction=0, eval_every=10**6, save_every=10**6, cache_base=True)
    train(model, samples, tmp_path / "run", cfg, resume=False, progress=False)
    return load_drafter(tmp_path / "run" / "drafter", model)


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_equals_generate_on_tiny_families(family, tmp_path, default_model):
    _, tokenizer = default_model  # decodes the tiny vocabulary's ids; its EOS id (2) is the tiny models' too
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (int(n),), generator=gen).tolist() for n in (5, 9, 14, 20)]
    trained = briefly_trained(model, tmp_path, prompts)
    assert trained.token_counts is not None  # saved by the trainer from its data
    for drafter, tree, vocab in [(perturbed_drafter(model, heads=5), "small", "auto"), (trained, "chain4", "auto"),
                                 (trained, DynamicTree(size=12, depth=4, beam=3), "auto"),
                                 (trained, DynamicTree(size=12, depth=4, beam=3), 24)]:
        # adaptive=False: this test measures the drafter's acceptance, which timing-driven pauses would vary
        decoder = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, draft_vocab=vocab, adaptive=False)
        slotted = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, draft_vocab=vocab, adaptive=False)
        slotted.verifier = SlotVerifier(model, graphs=False)  # what the GPU path replays, run eagerly
        compiled = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, draft_vocab=vocab, adaptive=False)
        compiled.verifier = SlotVerifier(model, graphs=False, compiled=True, backend="aot_eager",
                                         padded_prefill=True)  # the GPU's bfloat16 path, run eagerly
        queued = as_on_a_gpu(SpeculativeDecoder(model, tokenizer, drafter, tree=tree, draft_vocab=vocab,
                                                adaptive=False))  # speculative steps launched before a read
        taus = []
        for ids in prompts:
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=48)
            for result in (decoder.generate(input_ids=ids, max_new_tokens=48),
                           slotted.generate(input_ids=ids, max_new_tokens=48),
                           compiled.generate(input_ids=ids, max_new_tokens=48),
                           queued.generate(input_ids=ids, max_new_tokens=48)):
                assert result.token_ids == ref[0, len(ids):].tolist()
                assert sum(result.accepted) == result.new_tokens and len(result.accepted) == result.steps
                taus.append(result.tau)
        assert compiled.verifier.decoder.failure is None
        assert all(bank.move.failure is None for bank in compiled.verifier.banks.values())  # compiled compaction
    assert max(taus) > 1.5  # the trained drafter's paths were accepted


def test_save_load_roundtrip_proposes_the_same(tmp_path):
    model = tiny_model("qwen2")
    drafter = perturbed_drafter(model)
    drafter.save(tmp_path / "d")
    loaded = load_any(tmp_path / "d", model)
    tokens = torch.randint(3, 128, (12,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]), "cpu")
    a = drafter.propose(drafter.start(tokens[:-1], hidden[:-1]), tokens[-1:], tree)
    b = loaded.propose(loaded.start(tokens[:-1], hidden[:-1]), tokens[-1:], tree)
    assert torch.equal(a, b)


def test_drafter_for_another_base_is_refused(tmp_path):
    perturbed_drafter(tiny_model("llama", seed=0)).save(tmp_path / "d")
    with pytest.raises(ChimeraError, match="built for base"):
        load_drafter(tmp_path / "d", tiny_model("llama", seed=1))
    with pytest.raises(ChimeraError, match="built for base"):
        load_drafter(tmp_path / "d", tiny_model("llama", hidden_size=32, vocab_size=128))


def test_broken_drafter_directories(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ChimeraError, match="does not exist"):
        load_any(tmp_path / "nowhere", model)
    good = tmp_path / "good"
    perturbed_drafter(model).save(good)
    for missing in ("config.json", "model.safetensors"):
        broken = tmp_path / f"no-{missing}"
        perturbed_drafter(model).save(broken)
        (broken / missing).unlink()
        with pytest.raises(ChimeraError, match=f"missing {missing}"):
            load_any(broken, model)
    wrong = tmp_path / "wrong-shapes"
    perturbed_drafter(model).save(wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 64
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ChimeraError, match="wrong shapes"):
        load_any(wrong, model)
    garbage = tmp_path / "garbage"
    perturbed_drafter(model).save(garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ChimeraError, match="unreadable"):
        load_any(garbage, model)
    (garbage / "config.json").write_text("{not json")
    with pytest.raises(ChimeraError, match="not valid JSON"):
        load_any(garbage, model)
    from safetensors.torch import save_file

    counts = tmp_path / "bad-counts"
    perturbed_drafter(model).save(counts)
    (counts / "token_counts.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ChimeraError, match="token counts .* are unreadable"):
        load_any(counts, model)
    save_file({"counts": torch.zeros(7, dtype=torch.long)}, str(counts / "token_counts.safetensors"))
    with pytest.raises(ChimeraError, match=r"must hold 'counts' of shape \(128,\)"):
        load_any(counts, model)


def test_tree_deeper_than_heads_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(ChimeraError, match="heads"):
        SpeculativeDecoder(model, None, perturbed_drafter(model, heads=2), tree="small")


def test_static_drafting_equals_drafting_and_states_refill_in_place():
    """propose_static (fixed shapes, what the CUDA graph replays) drafts what propose drafts, and a reused
    state keeps its buffers (the graph reads them) while holding the new prompt's values."""
    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=4)
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)]),
                             "cpu")
    tokens = torch.randint(3, 128, (40,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    static = drafter.start(tokens[:5], hidden[:5], capacity=64)
    # attention weighs the unused slots by 0, which only leaves them out if they hold finite numbers
    assert torch.isfinite(static.keys).all() and torch.isfinite(static.values).all()
    buffers = (static.keys, static.values, static.history, static.last_hidden)
    for lo, hi in [(5, 9), (9, 10), (10, 31)]:
        drafter.advance(static, tokens[lo:hi], hidden[lo:hi])
        fresh = drafter.start(tokens[:hi], hidden[:hi])
        root = tokens[hi:hi + 1]
        assert torch.equal(drafter.propose_static(static, root, tree), drafter.propose(fresh, root, tree))
        assert torch.equal(drafter.propose_static(static, root, tree, window=32), drafter.propose(fresh, root, tree))
    refilled = drafter.start(tokens[:12], hidden[:12], reuse=static)
    assert refilled is static and static.length == 12 and int(static.length_on_device) == 12
    assert all(a is b for a, b in zip(buffers, (static.keys, static.values, static.history, static.last_hidden)))
    fresh = drafter.start(tokens[:12], hidden[:12])
    assert torch.equal(drafter.propose_static(static, tokens[12:13], tree), drafter.propose(fresh, tokens[12:13], tree))


def tree_paths(tokens: torch.Tensor, tree: TreeBuffers) -> set:
    """Each node as the tuple of tokens from the root down to it."""
    parents, out = tree.parents.tolist(), []
    for i in range(tokens.numel()):
        path, j = [], i
        while j != 0:
            path.append(int(tokens[j]))
            j = parents[j]
        out.append(tuple(reversed(path)))
    return set(out)


def check_tree(tokens: torch.Tensor, tree: TreeBuffers) -> None:
    """A well-formed tree in depth order: what greedy and sampled acceptance rely on."""
    parents, depths = tree.parents.tolist(), tree.depths.tolist()
    assert parents[0] == 0 and depths[0] == 0
    for i in range(1, len(parents)):
        assert parents[i] < i and depths[i] == depths[parents[i]] + 1 and depths[i] >= depths[i - 1]
    siblings = {}
    for i in range(1, len(parents)):
        assert int(tokens[i]) not in siblings.setdefault(parents[i], set())  # distinct candidates per parent
        siblings[parents[i]].add(int(tokens[i]))
    expected = TreeBuffers.build(TreeTopology(tuple([-1] + parents[1:]), tuple(range(len(parents)))), "cpu")
    assert torch.equal(tree.ancestors, expected.ancestors)
    assert torch.equal(tree.earlier_siblings, expected.earlier_siblings)


def test_dynamic_tree_of_beam_one_is_the_top_one_chain():
    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=4)
    tokens = torch.randint(3, 128, (30,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    chain = TreeBuffers.build(TreeTopology.chain(4), "cpu")
    dynamic = TreeBuffers.build(DynamicTree(size=5, depth=4, beam=1), "cpu")
    for n in (3, 11, 29):
        state, root = drafter.start(tokens[:n], hidden[:n]), tokens[n:n + 1]
        assert torch.equal(drafter.propose(state, root, dynamic), drafter.propose(state, root, chain))
        assert torch.equal(dynamic.ancestors, chain.ancestors) and torch.equal(dynamic.depths, chain.depths)


def test_dynamic_tree_of_depth_two_holds_every_candidate():
    """Depth 2, beam b, 1 + b + b*b nodes: every candidate is kept, so the tree is the full static one."""
    model = tiny_model("qwen2")
    drafter = perturbed_drafter(model, heads=2)
    tokens = torch.randint(3, 128, (20,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    full = TreeBuffers.build(TreeTopology.full([3, 3]), "cpu")
    dynamic = TreeBuffers.build(DynamicTree(size=13, depth=2, beam=3), "cpu")
    state, root = drafter.start(tokens[:15], hidden[:15]), tokens[15:16]
    drafted = drafter.propose(state, root, dynamic)
    check_tree(drafted, dynamic)
    assert tree_paths(drafted, dynamic) == tree_paths(drafter.propose(state, root, full), full)


def test_dynamic_trees_are_well_formed_and_drafted_the_same_statically():
    """Deeper trees keep the likeliest paths: well-formed, and propose_static (what the CUDA graph replays)
    builds the very same tree into the same buffers."""
    model = tiny_model("mistral")
    drafter = perturbed_drafter(model, heads=4)
    tokens = torch.randint(3, 128, (40,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    shape = DynamicTree(size=20, depth=4, beam=3)
    eager, static_tree = TreeBuffers.build(shape, "cpu"), TreeBuffers.build(shape, "cpu")
    buffers = (static_tree.parents, static_tree.depths, static_tree.ancestors, static_tree.earlier_siblings)
    static = drafter.start(tokens[:8], hidden[:8], capacity=64)
    depths_seen = set()
    for lo, hi in [(8, 9), (9, 20), (20, 31)]:  # within the 32-slot window
        drafter.advance(static, tokens[lo:hi], hidden[lo:hi])
        fresh = drafter.start(tokens[:hi], hidden[:hi])
        root = tokens[hi:hi + 1]
        drafted = drafter.propose(fresh, root, eager)
        check_tree(drafted, eager)
        assert torch.equal(drafter.propose_static(static, root, static_tree, window=32), drafted)
        assert torch.equal(static_tree.ancestors, eager.ancestors)
        depths_seen |= set(eager.depths.tolist())
    assert buffers == (static_tree.parents, static_tree.depths, static_tree.ancestors, static_tree.earlier_siblings)
    assert max(depths_seen) >= 3  # the tree went deep somewhere, not just wide


def test_static_advance_equals_advance_for_every_accepted_length():
    """advance_static (fixed-size padded inputs, a device count: what the CUDA graph replays) leaves the state
    as advance does, whatever junk fills the padding."""
    model = tiny_model("qwen2")
    drafter = perturbed_drafter(model, heads=4)
    tokens = torch.randint(3, 128, (40,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    static = drafter.start(tokens[:6], hidden[:6], capacity=64)
    eager = drafter.start(tokens[:6], hidden[:6], capacity=64)
    length, width = 6, 5
    for count in (1, 3, 5, 2, 4):
        padded_tokens = torch.randint(3, 128, (width,))
        padded_hidden = torch.randn(width, hidden.shape[-1])
        padded_tokens[:count] = tokens[length:length + count]
        padded_hidden[:count] = hidden[length:length + count]
        drafter.advance_static(static, padded_tokens, padded_hidden, torch.tensor(count))
        static.length += count
        drafter.advance(eager, tokens[length:length + count], hidden[length:length + count])
        length += count
        assert int(static.length_on_device) == static.length == eager.length == length
        torch.testing.assert_close(static.keys[:, :length], eager.keys[:, :length], atol=1e-6, rtol=0)
        torch.testing.assert_close(static.values[:, :length], eager.values[:, :length], atol=1e-6, rtol=0)
        assert torch.equal(static.history, eager.history) and torch.equal(static.last_hidden, eager.last_hidden)
        root = tokens[length:length + 1]
        tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 0, 0)]), "cpu")
        assert torch.equal(drafter.propose_static(static, root, tree), drafter.propose(eager, root, tree))


def test_a_graphed_drafters_state_kept_is_its_state_before_the_block():
    """``GraphedDrafter.state_kept`` (the advance graph's capture, a probe's timed replays): the drafter advanced for
    real inside the block, its state's buffers are bit for bit what they were before it, also when the block fails."""
    from chimera.drafters.graphs import GraphedDrafter

    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=4)
    tokens = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(5))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (0, 0)]), "cpu")
    graphed = GraphedDrafter(drafter, tree, capacity=64, graphs=False)
    state = graphed.start(tokens[:6], hidden[:6])

    def buffers():
        # listed here, not through ``state.buffers()``, which ``state_kept`` uses: a tensor left out there fails here
        return [t.clone() for t in (state.keys, state.values, state.history, state.last_hidden,
                                    state.length_on_device)]

    before = buffers()
    with graphed.state_kept(state):
        drafter.advance_static(state, tokens[6:9], hidden[6:9], torch.tensor(3))
        assert not all(torch.equal(a, b) for a, b in zip(buffers(), before))  # the block did move it
    assert all(torch.equal(a, b) for a, b in zip(buffers(), before))
    with pytest.raises(RuntimeError, match="a failed capture"):
        with graphed.state_kept(state):
            drafter.advance_static(state, tokens[6:8], hidden[6:8], torch.tensor(2))
            raise RuntimeError("a failed capture")
    assert all(torch.equal(a, b) for a, b in zip(buffers(), before))


def test_draft_vocabulary_drafts_only_frequent_tokens():
    """FR-Spec: with a draft vocabulary every drafted token is one of the most counted; with all tokens the
    drafts are those of the full projection. Without counts, or for Medusa heads, asking is an error."""
    from chimera.drafters import apply_draft_vocabulary
    from chimera.drafters.medusa import MedusaDrafter

    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=4)
    tokens = torch.randint(3, 128, (30,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    state, root = drafter.start(tokens[:20], hidden[:20]), tokens[20:21]
    trees = [TreeBuffers.build(TreeTopology.full([3, 2, 2]), "cpu"),
             TreeBuffers.build(DynamicTree(size=16, depth=4, beam=3), "cpu")]
    full = [drafter.propose(state, root, tree) for tree in trees]
    with pytest.raises(ChimeraError, match="no token counts"):
        apply_draft_vocabulary(drafter, 16, torch.device("cpu"))
    assert apply_draft_vocabulary(drafter, "auto", torch.device("cpu")) is None  # nothing to rank by: all tokens
    drafter.token_counts = torch.randint(0, 1000, (drafter.config.vocab_size,))
    frequent = set(drafter.token_counts.argsort(descending=True)[:16].tolist())
    assert apply_draft_vocabulary(drafter, 16, torch.device("cpu")) == 16
    for tree in trees:
        drafted = drafter.propose(state, root, tree)
        check_tree(drafted, tree)
        assert set(drafted[1:].tolist()) <= frequent
    default = drafter.draft_logits(1, hidden[:3])[0]
    for route in target.HEAD_ROUTES:  # projected the way the base's head is (calibration.py): the same logits
        assert apply_draft_vocabulary(drafter, 16, torch.device("cpu"), route) == 16
        logits, columns = drafter.draft_logits(1, hidden[:3])
        torch.testing.assert_close(logits, default, atol=1e-5, rtol=1e-5)
        assert set(columns.tolist()) == frequent
    apply_draft_vocabulary(drafter, drafter.config.vocab_size, torch.device("cpu"))
    assert all(torch.equal(drafter.propose(state, root, tree), f) for tree, f in zip(trees, full))
    assert apply_draft_vocabulary(drafter, "auto", torch.device("cuda")) is None  # the GPU projection is cheap
    with pytest.raises(ChimeraError, match="draft vocabulary must be"):
        apply_draft_vocabulary(drafter, "most", torch.device("cpu"))
    with pytest.raises(ChimeraError, match="needs a Chimera drafter"):
        apply_draft_vocabulary(MedusaDrafter.for_base(model), 16, torch.device("cpu"))


@pytest.mark.parametrize("shape", ["static", "dynamic"])
def test_compiled_drafting_drafts_what_eager_drafting_drafts(shape):
    """What the GPU captures with ``compile_drafter`` (drafters/graphs.py): each level's layer and head through
    torch.compile (``compiled_levels``), traced here by Dynamo (aot_eager backend), drafts the same trees as the eager
    drafter, between advances by device counts."""
    torch._dynamo.reset()
    model = tiny_model("gemma")
    drafter = perturbed_drafter(model, heads=4)
    drafter.acceptance_odds = [(0.9, -0.2), (1.1, 0.3), (1.3, 0.8)]  # the fourth head's paths scored as they come
    levels = drafter.compiled_levels("aot_eager")
    tokens = torch.randint(3, 128, (40,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    topology = (DynamicTree(size=12, depth=4, beam=3) if shape == "dynamic"
                else TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)]))
    eager_tree, compiled_tree = TreeBuffers.build(topology, "cpu"), TreeBuffers.build(topology, "cpu")
    eager = drafter.start(tokens[:6], hidden[:6], capacity=64)
    compiled = drafter.start(tokens[:6], hidden[:6], capacity=64)
    length, width = 6, 5
    for count in (2, 5, 1, 3):
        padded_tokens, padded_hidden = tokens[length:length + width], hidden[length:length + width]
        drafter.advance_static(eager, padded_tokens, padded_hidden, torch.tensor(count))
        drafter.advance_static(compiled, padded_tokens, padded_hidden, torch.tensor(count))
        length += count
        root = tokens[length:length + 1]
        expected = drafter.propose_static(eager, root, eager_tree, window=32)
        assert torch.equal(drafter.propose_static(compiled, root, compiled_tree, window=32, levels=levels), expected)
        assert torch.equal(compiled_tree.ancestors, eager_tree.ancestors)
        assert torch.equal(compiled.history, eager.history)
    assert levels.inputs.failure is None and levels.output.failure is None
    assert all(part.failure is None for part in levels)  # the beam's and the tree's choice too
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # Dynamo traced them, not a fallback


@pytest.mark.parametrize("columns", [4096, 5000, 49152, 3])
def test_blockwise_top_k_equals_top_k(columns):
    """The GPU's two-pass top-k (drafting over a vocabulary-wide row) finds torch.topk's values and columns, best
    first, also where the row is not a whole number of blocks or narrower than one."""
    from chimera.drafters.chimera import blockwise_top_k

    scores = torch.randn(3, 8, columns)  # distinct values: no ties to resolve otherwise
    k = min(8, columns)
    values, index = blockwise_top_k(scores, k, chunk=1024)
    expected = scores.topk(k)
    assert torch.equal(values, expected.values) and torch.equal(index, expected.indices)


def test_odds_line_moves_probabilities_along_a_line_in_log_odds():
    logp = torch.tensor([0.02, 0.25, 0.45, 0.65, 0.999]).log()
    assert torch.allclose(odds_line(logp, 1.0, 0.0), logp, atol=1e-5)  # the identity line changes nothing
    moved = odds_line(logp, 1.5, 1.2)
    p = logp.exp()
    assert torch.allclose(moved.exp(), torch.sigmoid(1.5 * torch.log(p / (1 - p)) + 1.2), atol=1e-5)
    assert bool((moved.diff() > 0).all()) and bool((moved <= 0).all())  # the order kept, still probabilities
    assert float(moved[2].exp()) > 0.6  # a deep head's 0.45, accepted far more often (docs/training.md), scored so


def test_acceptance_odds_change_only_which_paths_a_dynamic_tree_holds(tmp_path):
    """Lines that raise deep heads' probabilities draw the tree deeper, and drafting is otherwise what it was: the
    identity lines draft the very same tree, the static (captured) drafting builds the same tree as the eager one,
    and the lines survive saving and loading."""
    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=4)
    tokens = torch.randint(3, 128, (30,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    shape = DynamicTree(size=16, depth=4, beam=3)
    root = tokens[20:21]

    def drafted(odds):
        drafter.acceptance_odds = odds
        tree = TreeBuffers.build(shape, "cpu")
        out = drafter.propose(drafter.start(tokens[:20], hidden[:20]), root, tree)
        check_tree(out, tree)
        static_tree = TreeBuffers.build(shape, "cpu")
        static = drafter.propose_static(drafter.start(tokens[:20], hidden[:20], capacity=32), root, static_tree)
        assert torch.equal(static, out) and torch.equal(static_tree.parents, tree.parents)
        return tree_paths(out, tree), float(tree.depths.float().mean())

    plain, plain_depth = drafted(None)
    assert drafted([(1.0, 0.0)] * 4)[0] == plain
    deeper = [(1.0, 0.0), (1.0, 0.0), (1.0, 10.0), (1.0, 10.0)]  # the third and fourth heads as good as certain
    paths, depth = drafted(deeper)
    assert paths != plain and depth > plain_depth
    drafter.save(tmp_path / "d")
    assert load_any(tmp_path / "d", model).acceptance_odds == deeper


@pytest.mark.parametrize("odds", [[[1.0, 0.0]] * 9, [[0.0, 1.0]], [[-1.0, 0.0]], [[1.0, float("nan")]], [[True, 0.0]],
                                  [[1.0]], "lines", [], [[1.0, 0.0, 2.0]]])
def test_malformed_acceptance_odds_are_left_out(odds):
    assert persist.acceptance_odds({"acceptance_odds": odds}, heads=8) is None


def test_decoding_with_acceptance_odds_equals_generate(default_model):
    _, tokenizer = default_model
    model = tiny_model("qwen2")
    drafter = perturbed_drafter(model, heads=4)
    drafter.acceptance_odds = [(0.9, -0.2), (1.1, 0.3), (1.3, 0.8), (1.5, 1.2)]
    for tree in (DynamicTree(size=12, depth=4, beam=3), DynamicTree(size=20, depth=4, beam=4)):
        decoder = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False)
        for n in (6, 13):
            ids = torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40)
            assert decoder.generate(input_ids=ids, max_new_tokens=40).token_ids == ref[0, n:].tolist()
