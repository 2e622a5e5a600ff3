"""Medusa heads beside the Chimera drafter (same interface, same trainer), and trees built from measured
acceptance."""

import itertools
import random

import numpy as np
import pytest
import torch

from chimera import ChimeraError, SpeculativeDecoder, cache as kv, target
from chimera.drafters import load_any, new_drafter
from chimera.drafters.medusa import MedusaDrafter
from chimera.train.losses import acceptance_counts, chain_events, confidence_counts
from chimera.train.trainer import CONFIDENCE_BINS, TrainConfig, acceptance_odds, train
from chimera.tree import AUTO_TREE_SIZE, DYNAMIC_BEAM, DynamicTree, TreeBuffers, TreeTopology, get_topology
from conftest import FAMILIES, tiny_model


def perturbed_medusa(model, heads=4):
    drafter = MedusaDrafter.for_base(model, num_draft_heads=heads)
    for block in drafter.blocks:
        torch.nn.init.normal_(block.linear.weight, std=0.3)
    drafter.calibrate_head_norm(torch.randn(8, model.config.hidden_size))
    return drafter.eval()


def test_medusa_training_forward_matches_inference():
    model = tiny_model("llama")
    drafter = perturbed_medusa(model)
    tokens = torch.randint(3, 128, (1, 20))
    hidden = target.forward(model, kv.new_cache(), tokens[0]).hidden
    with torch.no_grad():
        logits, us = drafter(tokens, hidden[None], 4)
    assert us == [None] * 4
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0)]),
                             "cpu")
    for root in range(1, 19):
        proposed = drafter.propose(drafter.start(tokens[0, :root], hidden[:root]), tokens[0, root:root + 1], tree)
        top = [logits[k][0, root].topk(2).indices.tolist() for k in range(4)]
        depth_rank = [(1, 0), (1, 1), (2, 0), (2, 1), (2, 0), (3, 0), (4, 0)]  # BFS: (0,0) (0,1) (1,0)
        assert proposed[1:].tolist() == [top[d - 1][r] for d, r in depth_rank]


@pytest.mark.parametrize("family", FAMILIES)
def test_medusa_decoding_equals_generate(family, default_model, tmp_path):
    _, tokenizer = default_model
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (int(n),), generator=gen).tolist() for n in (6, 11, 17)]
    samples = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40)[0]
        samples.append((out.numpy(), np.array([0] * len(ids) + [1] * (out.numel() - len(ids)), dtype=bool)))
    cfg = TrainConfig(steps=30, batch_size=2, max_len=96, roots_per_seq=24, depth=3, lr=2e-2, warmup_steps=3,
                      heldout_fraction=0, eval_every=10**6, save_every=10**6, cache_base=True, architecture="medusa")
    train(model, samples, tmp_path / "run", cfg, resume=False, progress=False)
    trained = load_any(tmp_path / "run" / "drafter", model)
    assert isinstance(trained, MedusaDrafter)
    taus = []
    for drafter in (perturbed_medusa(model, heads=3), trained):
        decoder = SpeculativeDecoder(model, tokenizer, drafter, tree="small" if drafter.config.num_draft_heads > 4
                                     else TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 0, 0)]), adaptive=False)
        for ids in prompts:
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40)
            result = decoder.generate(input_ids=ids, max_new_tokens=40)
            assert result.token_ids == ref[0, len(ids):].tolist()
            taus.append(result.tau)
    assert max(taus) > 1.2  # the trained heads' drafts were accepted


def test_unknown_architecture_is_refused(tmp_path):
    with pytest.raises(ChimeraError, match="unknown drafter architecture 'eagle'"):
        new_drafter("eagle", tiny_model("llama"))
    model = tiny_model("llama")
    perturbed_medusa(model).save(tmp_path / "d")
    config = (tmp_path / "d" / "config.json")
    config.write_text(config.read_text().replace('"medusa"', '"hydra"'))
    with pytest.raises(ChimeraError, match="field 'architecture': Input should be 'chimera' or 'medusa'"):
        load_any(tmp_path / "d", model)


def test_acceptance_counts_follow_the_chain():
    # one row, depth 2, vocab 4. Chain rooted at 1: depth 1 looks at t=1, depth 2 at t=2.
    targets = torch.tensor([[0, 2, 3, 1]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    roots = torch.tensor([[1, 2]])
    d1 = torch.tensor([[[0., 0, 5, 1], [0, 0, 0, 0]]])  # chain 1: target 2 is rank 0; chain 2: ties, rank 0
    d1[0, 1] = torch.tensor([4., 3, 2, 1])  # chain 2 (t=2): target 3 has rank 3
    d2 = torch.tensor([[[1., 0, 0, 9], [0, 0, 0, 0]]])  # chain 1 (t=2): target 3 is rank 0
    events = chain_events([d1, d2], roots, targets, mask)
    counts = acceptance_counts(events, max_rank=2)
    assert counts.tolist() == [[1, 0, 1], [1, 0, 0]]  # chain 2 stopped at depth 1 (rank 3 >= 2)
    # the same chains' top-2 candidates by probability: depth 1 holds both chains (4 candidates), depth 2 chain 1 only
    confidence = confidence_counts([d1, d2], events, bins=4, top=2)
    assert confidence[:, 0].sum(-1).tolist() == [4, 2]
    p1 = torch.softmax(d1[0, 0], -1)  # chain 1's top draft (token 2) was the base's token, in the bin of its probability
    assert confidence[0, 1, int(p1[2] * 4)] == 1 and confidence[0, 1].sum() == 1
    assert torch.isclose(confidence[1, 2].sum(), torch.softmax(d2[0, 0], -1).topk(2).values.sum().double())
    assert confidence[1, 1].sum() == 1  # chain 1's depth-2 draft (token 3) was right


def test_acceptance_odds_recover_the_line_the_acceptances_were_drawn_from():
    """Candidates accepted with sigmoid(1.4 logit(p) + 0.9) at depth 2 and at their own probability at depth 1: the
    fit finds both lines; a depth with too few candidates ends the list."""
    rng = np.random.default_rng(0)
    bins = CONFIDENCE_BINS
    confidence = np.zeros((3, 3, bins))
    for depth, (slope, intercept) in enumerate([(1.0, 0.0), (1.4, 0.9)]):
        p = rng.uniform(0.01, 0.99, 200_000)
        chance = 1 / (1 + np.exp(-(slope * np.log(p / (1 - p)) + intercept)))
        accepted = rng.uniform(size=p.size) < chance
        where = np.minimum((p * bins).astype(int), bins - 1)
        confidence[depth] = [np.bincount(where, minlength=bins), np.bincount(where, accepted, minlength=bins),
                             np.bincount(where, p, minlength=bins)]
    confidence[2, :, 5] = [10, 5, 2.6]  # a deeper depth seen ten times: not fitted
    (a1, b1), (a2, b2) = acceptance_odds(confidence)
    assert abs(a1 - 1.0) < 0.05 and abs(b1) < 0.05 and abs(a2 - 1.4) < 0.07 and abs(b2 - 0.9) < 0.05
    assert acceptance_odds(confidence[2:]) is None


def test_tree_from_profile_is_optimal_among_trees_of_its_size():
    profile = [[0.7, 0.15, 0.05], [0.6, 0.2, 0.1], [0.55, 0.2], [0.5]]
    for size in (2, 5, 9, 14):
        tree = TreeTopology.from_profile(profile, size)
        assert tree.size == size and tree.max_depth <= len(profile)
        best = tree.expected_accepted(profile)
        rng = random.Random(size)
        all_paths = [p for n in range(1, 5) for p in itertools.product(*[range(len(profile[k])) for k in range(n)])]
        for _ in range(200):  # random prefix-closed trees of the same size never do better
            chosen = {()}
            while len(chosen) < size:
                p = rng.choice(all_paths)
                if p[:-1] in chosen:
                    chosen.add(p)
            other = TreeTopology.from_paths([p for p in chosen if p])
            assert other.expected_accepted(profile) <= best + 1e-9
    assert TreeTopology.chain(3).expected_accepted(profile) == pytest.approx(1 + 0.7 + 0.42 + 0.231)


def test_tree_specs_resolve_with_and_without_a_profile():
    model = tiny_model("llama")
    drafter = new_drafter("chimera", model, num_draft_heads=3)
    assert get_topology("auto", drafter, torch.device("cpu")).size == 23  # no profile: the named default
    with pytest.raises(ChimeraError, match="lacks"):
        get_topology("7", drafter, "cpu")  # a size needs a profile
    drafter.acceptance_profile = [[0.5, 0.2, 0.1], [0.5, 0.2, 0.1], [0.5, 0.2], [0.5]]
    assert get_topology("auto", drafter, torch.device("cpu")).size == AUTO_TREE_SIZE["cpu"]
    assert get_topology("auto", drafter, torch.device("cuda")) == DynamicTree(size=64, depth=3, beam=DYNAMIC_BEAM)
    medusa = perturbed_medusa(model, heads=3)
    medusa.acceptance_profile = drafter.acceptance_profile
    assert get_topology("auto", medusa, torch.device("cuda")).size == 31  # every node the profile allows (< 64)
    tree = get_topology("7", drafter, "cpu")
    assert tree.size == 7 and tree.max_depth <= 3  # never deeper than the heads
    for bad, message in [("huge", "unknown tree"), ("1", "at least 2 nodes")]:
        with pytest.raises(ChimeraError, match=message):
            get_topology(bad, drafter, "cpu")


def test_dynamic_tree_specs():
    model = tiny_model("llama")
    chimera_drafter = new_drafter("chimera", model, num_draft_heads=3)
    assert get_topology("dynamic-20", chimera_drafter, "cpu") == DynamicTree(size=20, depth=3, beam=DYNAMIC_BEAM)
    assert get_topology("dynamic-10-2", chimera_drafter, "cpu") == DynamicTree(size=10, depth=3, beam=2)
    assert get_topology("dynamic-6-2-2", chimera_drafter, "cpu") == DynamicTree(size=6, depth=2, beam=2)
    # the automatic GPU tree is at most 6 deep, and never deeper than the drafter's heads
    assert get_topology("auto", chimera_drafter, "cuda") == DynamicTree(size=64, depth=3, beam=DYNAMIC_BEAM)
    eight_heads = new_drafter("chimera", model, num_draft_heads=8)
    assert get_topology("auto", eight_heads, "cuda") == DynamicTree(size=64, depth=6, beam=DYNAMIC_BEAM)
    for bad, message in [("dynamic", "dynamic-N"), ("dynamic-x", "dynamic-N"), ("dynamic-1", "at least 2"),
                         ("dynamic-5-0", "beam 1"), ("dynamic-20-2", "more candidates"),
                         ("dynamic-8-2-4", "4 deep but the drafter has 3 heads"), ("dynamic-8-2-0", "depth 1"),
                         ("dynamic-8-2-2-2", "dynamic-N")]:
        with pytest.raises(ChimeraError, match=message):
            get_topology(bad, chimera_drafter, "cpu")
    with pytest.raises(ChimeraError, match="static trees only"):
        get_topology("dynamic-20", perturbed_medusa(model), "cpu")
    with pytest.raises(ChimeraError, match="static trees only"):
        SpeculativeDecoder(model, None, perturbed_medusa(model), tree=DynamicTree(size=8, depth=3, beam=2))
