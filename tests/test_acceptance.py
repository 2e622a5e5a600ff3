"""Greedy acceptance picks the longest path that greedy decoding would have produced."""

import torch

from chimera.tree import TreeBuffers, TreeTopology
from chimera.acceptance import greedy_accept, greedy_accept_chains

V = 10


def logits_predicting(next_tokens):
    logits = torch.zeros(len(next_tokens), V)
    logits[torch.arange(len(next_tokens)), torch.tensor(next_tokens)] = 5.0
    return logits


def path_and_bonus(tokens, logits, tree):
    """The accepted nodes and the bonus token, after checking the padding that keeps the shapes fixed."""
    accepted = greedy_accept(tokens, logits, tree)
    n = int(accepted.length)
    assert accepted.path.shape == (tree.topology.max_depth + 1,) and accepted.path[n:].eq(0).all()
    return accepted.path[:n], accepted.next_token


def test_accepts_longest_matching_path_and_bonus_token():
    # root(0) -> a(1), b(2); a -> c(3), d(4); d -> e(5)
    tree = TreeBuffers.build(TreeTopology.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 1, 0)]), "cpu")
    tokens = torch.tensor([7, 3, 4, 1, 2, 6])
    # base: after root -> 4 (node b), after b -> 9 (no child matches)
    path, bonus = path_and_bonus(tokens, logits_predicting([4, 0, 9, 0, 0, 0]), tree)
    assert path.tolist() == [0, 2] and int(bonus) == 9
    # base: after root -> 3 (a), after a -> 2 (d), after d -> 6 (e), after e -> 8
    path, bonus = path_and_bonus(tokens, logits_predicting([3, 2, 0, 0, 6, 8]), tree)
    assert path.tolist() == [0, 1, 4, 5] and int(bonus) == 8


def test_nothing_accepted_returns_root_and_base_token():
    tree = TreeBuffers.build(TreeTopology.chain(3), "cpu")
    tokens = torch.tensor([1, 2, 3, 4])
    path, bonus = path_and_bonus(tokens, logits_predicting([5, 3, 4, 0]), tree)
    assert path.tolist() == [0] and int(bonus) == 5


def test_a_correct_node_under_a_wrong_parent_is_not_accepted():
    tree = TreeBuffers.build(TreeTopology.chain(2), "cpu")
    tokens = torch.tensor([1, 2, 3])
    path, bonus = path_and_bonus(tokens, logits_predicting([9, 3, 0]), tree)  # node 2 matches node 1's argmax
    assert path.tolist() == [0] and int(bonus) == 9


def test_a_chain_per_row_is_accepted_as_each_chain_alone():
    """The running batch's acceptance, every row's chain at once, against the tree acceptance of each chain alone;
    a row not drafted accepts nothing and takes the base's token after its newest."""
    gen = torch.Generator().manual_seed(3)
    tree = TreeBuffers.build(TreeTopology.chain(3), "cpu")
    chains = torch.randint(0, 4, (32, 4), generator=gen)  # a small vocabulary: many drafts right
    logits = torch.randn(32, 4, V, generator=gen)
    logits[..., 4:] = -9.0
    drafted = torch.arange(32) % 5 != 0
    accepted, following = greedy_accept_chains(chains, logits, drafted)
    for row in range(32):
        path, bonus = path_and_bonus(chains[row], logits[row], tree)
        if drafted[row]:
            assert int(accepted[row]) == len(path) - 1 and int(following[row]) == int(bonus)
        else:
            assert int(accepted[row]) == 0 and int(following[row]) == int(logits[row, 0].argmax())
    assert 0 < int(accepted.sum()) and int(accepted.max()) == 3  # some drafts accepted, some whole chains


def test_a_root_only_tree_is_plain_decoding():
    tree = TreeBuffers.build(TreeTopology.chain(0), "cpu")
    path, bonus = path_and_bonus(torch.tensor([7]), logits_predicting([3]), tree)
    assert path.tolist() == [0] and int(bonus) == 3
