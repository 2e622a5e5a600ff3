"""Drafting for every row of a running batch at once (chimera/drafters/rows.py) drafts, in each row, the chain the
lone drafter drafts for that sequence alone."""

import pytest
import torch

from chimera.drafters.medusa import MedusaDrafter
from chimera.drafters.rows import PAD
from chimera.tree import TreeBuffers, TreeTopology
from conftest import tiny_model
from test_batch import counting_backend
from test_drafter import counted_drafter, perturbed_drafter

DEPTH = 3


def prompts_and_states(model, lengths=(5, 17, 2, 9), seed=1):
    """Prompts of mixed lengths, the base's final hidden states over each, and a root (the base's next token)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        prompt = torch.randint(3, model.config.vocab_size, (n,), generator=gen)
        with torch.no_grad():
            result = model(prompt[None], output_hidden_states=True)
        out.append((prompt, result.hidden_states[-1][0], result.logits[0, -1].argmax().reshape(1)))
    return out


def lone_chains(drafter, sequences):
    tree = TreeBuffers.build(TreeTopology.chain(DEPTH), "cpu")
    return torch.stack([drafter.propose(drafter.start(prompt, hidden), root, tree).clone()
                        for prompt, hidden, root in sequences])


def row_chains(drafter, sequences, capacity=64, split=None, backend=None):
    """Each sequence read into its row (in two reads at ``split`` where given, as a catch-up after a first read),
    padded to the longest as the batch's catch-up pads, then one chain per row (compiled with ``backend`` where
    given)."""
    rows = drafter.rows(len(sequences) + 1, capacity, "cpu")  # a spare row: rows need not all draft
    if backend is not None:
        rows.compile(backend)
    parts = [(0, split), (split, None)] if split else [(0, None)]
    for lo, hi in parts:
        spans = [(prompt[lo:hi], hidden[lo:hi]) for prompt, hidden, _ in sequences]
        width = max(len(span) for span, _ in spans)
        before = [torch.tensor([PAD, PAD]) if lo == 0 else prompt[lo - 2:lo] for prompt, _, _ in sequences]
        tokens = torch.stack([torch.cat([two, span, torch.zeros(width - len(span), dtype=torch.long)])
                              for two, (span, _) in zip(before, spans)])
        hidden = torch.stack([torch.cat([h, h.new_zeros(width - len(h), h.shape[-1])]) for _, h in spans])
        rows.read(torch.arange(len(sequences)), tokens, hidden, torch.full((len(sequences),), lo))
    last_two = [[PAD] * (2 - len(prompt[-2:])) + prompt[-2:].tolist() for prompt, _, _ in sequences]
    tokens = torch.tensor([two + [root.item()] for two, (_, _, root) in zip(last_two, sequences)])
    starts = torch.tensor([len(prompt) for prompt, _, _ in sequences])
    last_hidden = torch.stack([hidden[-1] for _, hidden, _ in sequences])
    return rows.propose(tokens, starts, last_hidden, DEPTH, torch.arange(capacity))


@pytest.mark.parametrize("split", [None, 2], ids=["one read", "read in two"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_row_drafts_the_chain_it_drafts_alone(family, split):
    model = tiny_model(family)
    drafter = perturbed_drafter(model, heads=DEPTH)
    sequences = prompts_and_states(model)
    expected = lone_chains(drafter, sequences)
    assert torch.equal(row_chains(drafter, sequences, split=split), expected)
    drafter.use_tables = False  # the trigram computed directly (on a GPU), as the lone drafter then does
    assert torch.equal(row_chains(drafter, sequences, split=split), lone_chains(drafter, sequences))


@pytest.mark.parametrize("tables", [True, False], ids=["trigram tables", "trigram computed"])
def test_compiled_chains_are_the_eager_ones_and_compile_once_for_any_rows(tables):
    """The chains a compiled batch drafts (``compiled_chains``, traced by Dynamo and run as traced): each row's chain
    as alone, for 4 rows and then 2 over buffers of another size, from one compilation (the rows and the buffers'
    sizes symbols)."""
    model = tiny_model("llama")
    drafter = counted_drafter(model, heads=DEPTH)
    drafter.use_draft_vocabulary(24)
    counting, compilations = counting_backend()
    sequences = prompts_and_states(model)
    drafter.use_tables = tables
    expected = lone_chains(drafter, sequences)
    drafter.prepare_inference = lambda: None  # keep the route under test (the CPU's would be the tables)
    assert torch.equal(row_chains(drafter, sequences, backend=counting), expected)
    assert torch.equal(row_chains(drafter, sequences[:2], capacity=96, backend=counting), expected[:2])
    assert len(compilations) == 1


def test_rows_draft_over_a_draft_vocabulary_as_alone():
    model = tiny_model("llama")
    drafter = counted_drafter(model, heads=DEPTH)
    drafter.use_draft_vocabulary(16)
    sequences = prompts_and_states(model)
    chains = row_chains(drafter, sequences)
    assert torch.equal(chains, lone_chains(drafter, sequences))
    assert torch.isin(chains[:, 1:], drafter.draft_vocab).all()


def test_a_moved_row_drafts_as_before():
    model = tiny_model("llama")
    drafter = perturbed_drafter(model, heads=DEPTH)
    prompt, hidden, root = prompts_and_states(model, lengths=(7,))[0]
    rows = drafter.rows(3, 32, "cpu")
    rows.read(torch.tensor([2]), torch.cat([torch.tensor([PAD, PAD]), prompt])[None], hidden[None], torch.tensor([0]))
    rows.move(2, 0, len(prompt))
    tokens = torch.tensor([prompt[-2:].tolist() + [root.item()]])
    chain = rows.propose(tokens, torch.tensor([len(prompt)]), hidden[-1:], DEPTH, torch.arange(32))
    assert torch.equal(chain, lone_chains(drafter, [(prompt, hidden, root)]))


def test_medusa_rows_draft_the_chain_medusa_drafts_alone():
    model = tiny_model("llama")
    drafter = MedusaDrafter.for_base(model, num_draft_heads=DEPTH)
    for block in drafter.blocks:
        torch.nn.init.normal_(block.linear.weight, std=0.2)
    sequences = prompts_and_states(model)
    assert torch.equal(row_chains(drafter, sequences), lone_chains(drafter, sequences))
