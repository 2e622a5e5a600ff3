"""Speculative sampling is lossless: its tokens are distributed exactly as autoregressive sampling's.

The statistical tests compare empirical frequencies with the exact distribution, which a vocabulary of 8
tokens lets us enumerate: Pearson's chi-square over outcomes, bins with an expected count below 5 pooled,
p-value from the chi-square law (df = bins - 1), fail below ALPHA. The seeds are fixed, so every run is the
same; the same statistic at the same sample size rejects wrong acceptance rules (see the *_wrong_* tests),
and scripts/sampling_power.py measures how small a deviation it detects.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from chimera import SpeculativeDecoder
from chimera import cache as kv, target
from chimera.cli import main as cli_main
from chimera.drafters.chimera import ChimeraDrafter
from chimera.errors import ChimeraError
from chimera.sampling import SamplingConfig, target_probs
from chimera.tree import DynamicTree, TreeBuffers, TreeTopology
from chimera.verifier import SlotVerifier
from chimera.acceptance import Accepted, accepted_path, draft_accept_probs, path_to, residual, sample_accept
from conftest import tiny_model

V = 8  # vocabulary: small enough to enumerate every 3-token continuation
PROMPT = [3, 5, 7, 4]
TREE = TreeTopology.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
ALPHA = 1e-3
MIN_EXPECTED = 5.0
CONFIGS = {
    "T0.5": SamplingConfig(temperature=0.5),
    "T1": SamplingConfig(temperature=1.0),
    "T1.5": SamplingConfig(temperature=1.5),
    "T1-topk3": SamplingConfig(temperature=1.0, top_k=3),
    "T0.8-topp0.7": SamplingConfig(temperature=0.8, top_p=0.7),
}
STEP_DRAWS = 6000  # one-step draws per configuration (sample_accept on fixed logits)
LOOP_SEEDS = 800  # full generations (3 tokens) per configuration
LOOP_TOKENS = 3


# ---------------------------------------------------------------- the statistic


def chi2_sf(stat: float, df: int) -> float:
    """P(chi2_df >= stat), through the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_critical(df: int, alpha: float = ALPHA) -> float:
    lo, hi = 0.0, 10.0 * df + 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return hi


def bins(expected: dict, n: int) -> tuple[dict, torch.Tensor]:
    """Outcome → bin, and each bin's probability, for a sample of size n: one bin per outcome expected at least
    MIN_EXPECTED times; the others, and any outcome the law does not allow, share a last bin, folded into the
    smallest bin when even together they are expected fewer than MIN_EXPECTED times."""
    big = sorted((k for k, p in expected.items() if n * p >= MIN_EXPECTED), key=lambda k: -expected[k])
    index = {k: i for i, k in enumerate(big)}
    probs = [expected[k] for k in big]
    rest = max(0.0, 1.0 - sum(probs))
    if n * rest >= MIN_EXPECTED:
        probs.append(rest)
    else:
        probs[-1] += rest
    return index, torch.tensor(probs, dtype=torch.float64)


def chi_square_stat(counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Pearson's statistic of bin counts (..., bins) against bin probabilities."""
    n = counts.sum(-1, keepdim=True)
    return ((counts - n * probs) ** 2 / (n * probs)).sum(-1)


def chi_square(samples: list, expected: dict) -> tuple[float, int, float]:
    """(statistic, df, p-value) of ``samples`` (hashable outcomes) against exact probabilities ``expected``."""
    index, probs = bins(expected, len(samples))
    counts = torch.zeros_like(probs)
    for k, c in Counter(samples).items():
        counts[index.get(k, len(probs) - 1)] += c
    stat = float(chi_square_stat(counts, probs))
    df = len(probs) - 1
    return stat, df, chi2_sf(stat, df)


def total_variation(samples: list, expected: dict) -> float:
    counts = Counter(samples)
    keys = set(counts) | set(expected)
    return 0.5 * sum(abs(counts.get(k, 0) / len(samples) - expected.get(k, 0.0)) for k in keys)


# ---------------------------------------------------------------- the model, a drafter, exact distributions


class CharTokenizer:
    """Token i decodes to one letter: all the decoding loop needs from a tokenizer here."""

    def decode(self, ids, **_):
        return "".join(chr(ord("a") + i) for i in ids)


class TableDrafter:
    """Proposes after token t the best candidates of a fixed (vocab, vocab) score table: deterministic, with
    distinct siblings, like every drafter; good enough to accept often and reach every depth."""

    def __init__(self, table: torch.Tensor):
        self.order = table.argsort(-1, descending=True)

    def start(self, prompt_ids, hidden):
        return None

    def propose(self, state, root, tree):
        tokens = [root.reshape(1)]
        for level in range(1, tree.topology.max_depth + 1):
            slots, ranks = tree.level_children(level)
            tokens.append(self.order[tokens[-1][slots], ranks])
        return torch.cat(tokens)

    def advance(self, state, tokens, hidden):
        pass


def peaked_model():
    """A tiny random Llama over 8 tokens and no EOS, its head scaled so next-token distributions are peaked
    (top token ~0.3-0.8) rather than near uniform."""
    model = tiny_model("llama", vocab_size=V, eos_token_id=None)
    model.lm_head.weight.mul_(6.0)
    return model


def model_and_drafter(device="cpu"):
    model = peaked_model().to(device)
    with torch.inference_mode():
        table = model(torch.arange(V, device=model.device)[:, None]).logits[:, -1]  # one token alone
    return model, TableDrafter(table)


@pytest.fixture(scope="module")
def setup():
    return model_and_drafter()


def exact_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The processed distribution in float64, each row renormalised (float32 softmax sums to 1 +- 1e-7)."""
    probs = target_probs(logits, config).double()
    return probs / probs.sum(-1, keepdim=True)


def sequence_logits(model, prefixes: list[list[int]]) -> torch.Tensor:
    """Next-token logits after each prefix (all the same length), in one plain batched forward."""
    with torch.inference_mode():
        return model(torch.tensor(prefixes, device=model.device)).logits[:, -1].float()


def exact_continuations(model, config: SamplingConfig, k: int = LOOP_TOKENS) -> dict:
    """P(x1..xk) under autoregressive sampling with ``config``, for every k-token continuation of PROMPT."""
    dist = {(): 1.0}
    for _ in range(k):
        prefixes = list(dist)
        probs = exact_probs(sequence_logits(model, [PROMPT + list(p) for p in prefixes]), config)
        dist = {p + (t,): dist[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(V)}
    return {seq: p for seq, p in dist.items() if p > 0}


def tree_step(model, drafter):
    """The tokens of one drafted tree after PROMPT + its greedy root, and the base's logits at every node."""
    cache = kv.new_cache()
    out = target.forward(model, cache, torch.tensor(PROMPT, device=model.device))
    root = out.logits[-1].argmax(-1, keepdim=True)
    tree = TreeBuffers.build(TREE, model.device)
    tokens = drafter.propose(None, root, tree)
    return tree, tokens, target.forward_tree(model, cache, tokens, tree.depths, tree.ancestors).logits


def exact_step(tree: TreeBuffers, tokens: torch.Tensor, probs: torch.Tensor) -> dict:
    """P(emitted tokens) for one step, what lossless sampling must give: the tokens of an accepted path then
    one token from the last node's distribution that is not one of its children (those would go deeper)."""
    topo, toks = tree.topology, tokens.tolist()
    dist = {}
    path_prob, path_tokens = {0: 1.0}, {0: ()}
    for i in range(1, topo.size):
        parent = topo.parents[i]
        path_prob[i] = path_prob[parent] * float(probs[parent, toks[i]])
        path_tokens[i] = path_tokens[parent] + (toks[i],)
    for node in range(topo.size):
        children = {toks[c] for c in range(1, topo.size) if topo.parents[c] == node}
        for t in range(probs.shape[1]):
            p = path_prob[node] * float(probs[node, t])
            if t not in children and p > 0:
                dist[path_tokens[node] + (t,)] = p
    return dist


def rule_law(tree: TreeBuffers, tokens: torch.Tensor, accept: torch.Tensor, final: torch.Tensor) -> dict:
    """P(emitted tokens) for one step of a rule that accepts node i with probability accept[i] once its parent
    was accepted and its earlier siblings rejected, and draws the last token from final[v] at the last node v."""
    topo, toks = tree.topology, tokens.tolist()
    law = Counter()

    def visit(node, reach, prefix):
        for child in (c for c in range(1, topo.size) if topo.parents[c] == node):
            visit(child, reach * float(accept[child]), prefix + (toks[child],))
            reach *= 1 - float(accept[child])
        for t in range(final.shape[1]):
            if reach * float(final[node, t]) > 0:
                law[prefix + (t,)] += reach * float(final[node, t])

    visit(0, 1.0, ())
    return dict(law)


def sample_accept_law(tree: TreeBuffers, tokens: torch.Tensor, probs: torch.Tensor) -> dict:
    """The exact law of one step of ``sample_accept``, built from its own parts (acceptance, residual)."""
    accept = draft_accept_probs(tokens, probs, tree)
    final = torch.stack([residual(probs[v], tokens, (tree.parents == v) & (tree.depths > 0))
                         for v in range(tree.topology.size)])
    return rule_law(tree, tokens, accept, final / final.sum(-1, keepdim=True))


def without_residual_law(tree: TreeBuffers, tokens: torch.Tensor, probs: torch.Tensor) -> dict:
    return rule_law(tree, tokens, probs[tree.parents, tokens], probs)


def emitted(tokens, accepted: Accepted) -> tuple:
    return tuple(tokens[accepted.path[1:int(accepted.length)]].tolist()) + (int(accepted.next_token),)


# ---------------------------------------------------------------- wrong rules the statistic must reject


def accept_without_residual(tokens, logits, tree, config, generator):
    """Wrong: accept child c with min(1, p(c)) and, after rejections, draw from p itself (no residual)."""
    probs = target_probs(logits, config)
    deepest = accepted_path(probs[tree.parents, tokens], tree, generator)
    result = path_to(deepest, tree)
    result.next_token = torch.multinomial(probs[deepest], 1, generator=generator)[0]
    return result


def typical_accept(tokens, logits, tree, config, generator, epsilon=0.3, delta=0.09):
    """Wrong (lossy by design): Medusa's typical acceptance, p(c) > min(epsilon, delta * exp(-entropy))."""
    probs = target_probs(logits, config)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)
    accept = (probs[tree.parents, tokens] > threshold[tree.parents]).float()
    deepest = accepted_path(accept, tree, generator)
    result = path_to(deepest, tree)
    result.next_token = torch.multinomial(probs[deepest], 1, generator=generator)[0]
    return result


def step_samples(rule, tree, tokens, logits, config, draws=STEP_DRAWS, seed=0) -> list:
    generator = torch.Generator(logits.device).manual_seed(seed)
    return [emitted(tokens, rule(tokens, logits, tree, config, generator)) for _ in range(draws)]


def loop_samples(model, drafter, config: SamplingConfig, seeds=LOOP_SEEDS, slots=False, tree=TREE
                 ) -> tuple[list, float]:
    decoder = SpeculativeDecoder(model, CharTokenizer(), drafter, tree=tree)
    if slots:  # the GPU's fixed-slot verification, run eagerly
        decoder.verifier = SlotVerifier(model, graphs=False)
    out, sped_up = [], 0
    for seed in range(seeds):
        r = decoder.generate(input_ids=PROMPT, max_new_tokens=LOOP_TOKENS, temperature=config.temperature,
                             top_k=config.top_k, top_p=config.top_p, seed=seed)
        assert sum(r.accepted) == r.new_tokens == LOOP_TOKENS and len(r.accepted) == r.steps
        out.append(tuple(r.token_ids))
        sped_up += r.steps < LOOP_TOKENS  # plain decoding takes one base forward per token
    return out, sped_up / seeds


# ---------------------------------------------------------------- tests: one step


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_step_matches_the_exact_distribution(setup, name):
    model, drafter = setup
    config = CONFIGS[name]
    tree, tokens, logits = tree_step(model, drafter)
    expected = exact_step(tree, tokens, exact_probs(logits, config))
    assert abs(sum(expected.values()) - 1) < 1e-9
    samples = step_samples(sample_accept, tree, tokens, logits, config)
    stat, df, p = chi_square(samples, expected)
    print(f"step {name}: chi2 {stat:.1f} df {df} p {p:.3g} (crit {chi2_critical(df):.1f}), "
          f"TV {total_variation(samples, expected):.4f}, mean emitted {sum(map(len, samples)) / len(samples):.2f}")
    assert p > ALPHA, (stat, df, p)
    assert sum(len(s) > 1 for s in samples) > STEP_DRAWS // 5  # drafts really were accepted, often


@pytest.mark.parametrize("rule", [accept_without_residual, typical_accept])
@pytest.mark.parametrize("name", ["T1", "T1.5"])
def test_one_step_rejects_wrong_rules(setup, rule, name):
    model, drafter = setup
    config = CONFIGS[name]
    tree, tokens, logits = tree_step(model, drafter)
    expected = exact_step(tree, tokens, exact_probs(logits, config))
    samples = step_samples(rule, tree, tokens, logits, config)
    stat, df, p = chi_square(samples, expected)
    print(f"step {name} {rule.__name__}: chi2 {stat:.1f} df {df} p {p:.3g}, TV {total_variation(samples, expected):.4f}")
    assert p < ALPHA, (stat, df, p)


# ---------------------------------------------------------------- tests: the decoding loop, many seeds


@pytest.mark.parametrize("name,slots", [(name, False) for name in CONFIGS] + [("T1", True)])
def test_generations_match_autoregressive_sampling(setup, name, slots):
    model, drafter = setup
    config = CONFIGS[name]
    expected = exact_continuations(model, config)
    samples, sped_up = loop_samples(model, drafter, config, slots=slots)
    stat, df, p = chi_square(samples, expected)
    first = chi_square([s[:1] for s in samples], exact_marginal(expected, 1))
    print(f"loop {name}: 3-token chi2 {stat:.1f} df {df} p {p:.3g}; first token p {first[2]:.3g}; "
          f"TV {total_variation(samples, expected):.3f}; {sped_up:.0%} of runs took a draft")
    assert p > ALPHA and first[2] > ALPHA, (stat, df, p, first)
    assert sped_up > 0.25  # the tree did its job: drafts were accepted, so fewer base forwards than tokens


@pytest.mark.parametrize("slots", [False, True])
def test_generations_with_a_dynamic_tree_match_autoregressive_sampling(setup, slots):
    """A tree the drafter picks from its own confidence is still a function of the verified prefix alone, so
    the rule stays lossless; checked with the Chimera drafter, which builds such trees."""
    model, _ = setup
    drafter = ChimeraDrafter.for_base(model, num_draft_heads=3)
    for head in drafter.heads:
        torch.nn.init.normal_(head.fc2.weight, std=0.5)
    config = CONFIGS["T1"]
    expected = exact_continuations(model, config)
    samples, sped_up = loop_samples(model, drafter.eval(), config, slots=slots,
                                    tree=DynamicTree(size=8, depth=3, beam=3))
    stat, df, p = chi_square(samples, expected)
    print(f"loop T1 dynamic tree: 3-token chi2 {stat:.1f} df {df} p {p:.3g}; {sped_up:.0%} of runs took a draft")
    assert p > ALPHA, (stat, df, p)
    assert sped_up > 0.25


def exact_marginal(expected: dict, k: int) -> dict:
    out = Counter()
    for seq, p in expected.items():
        out[seq[:k]] += p
    return dict(out)


def test_generations_reject_a_wrong_rule(setup, monkeypatch):
    """The same end-to-end statistic, with the decoder's acceptance replaced by the no-residual rule."""
    model, drafter = setup
    config = CONFIGS["T1"]
    monkeypatch.setattr("chimera.steps.sample_accept", accept_without_residual)
    samples, _ = loop_samples(model, drafter, config)
    stat, df, p = chi_square(samples, exact_continuations(model, config))
    print(f"loop T1 accept_without_residual: chi2 {stat:.1f} df {df} p {p:.3g}")
    assert p < ALPHA


# ---------------------------------------------------------------- tests: exactness against transformers


def hf_sample(model, ids, config: SamplingConfig, max_new_tokens: int):
    ids = torch.tensor([ids])
    torch.manual_seed(config.seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=max_new_tokens,
                         temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                         output_scores=True, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), out.logits, out.scores


@pytest.mark.parametrize("cfg", [dict(temperature=1.0), dict(temperature=0.5, top_k=5),
                                 dict(temperature=1.5, top_p=0.8), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_target_distribution_and_plain_sampling_equal_generate(cfg):
    """Our processed distribution is bit-for-bit generate's; with no drafter and the same seed, our loop even
    draws the same tokens (one multinomial per token from a generator seeded alike)."""
    model = tiny_model("llama", vocab_size=128)
    decoder = SpeculativeDecoder(model, CharTokenizer())
    prompt = [5, 9, 17, 33]
    for seed in range(3):
        config = SamplingConfig(**cfg, seed=seed)
        tokens, logits, scores = hf_sample(model, prompt, config, 10)
        for raw, processed in zip(logits, scores):
            assert torch.equal(target_probs(raw, config), torch.softmax(processed, -1))
        assert decoder.generate(input_ids=prompt, max_new_tokens=10, **cfg, seed=seed).token_ids == tokens


def test_temperature_zero_is_greedy_and_exact(setup):
    model, drafter = setup
    decoder = SpeculativeDecoder(model, CharTokenizer(), drafter, tree=TREE, adaptive=False)
    ids = torch.tensor([PROMPT])
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    result = decoder.generate(input_ids=PROMPT, max_new_tokens=24, temperature=0.0, top_k=3, top_p=0.5, seed=1)
    assert result.token_ids == greedy[0, len(PROMPT):].tolist()
    assert result.tau > 1


def test_seed_makes_runs_reproducible(setup):
    model, drafter = setup
    decoder = SpeculativeDecoder(model, CharTokenizer(), drafter, tree=TREE)
    runs = [decoder.generate(input_ids=PROMPT, max_new_tokens=24, temperature=1.0, top_p=0.9, seed=s).token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    unseeded = decoder.generate(input_ids=PROMPT, max_new_tokens=24, temperature=1.0)
    assert unseeded.new_tokens == 24


def test_stream_takes_the_same_arguments(setup):
    model, drafter = setup
    decoder = SpeculativeDecoder(model, CharTokenizer(), drafter, tree=TREE)
    stream = decoder.stream(input_ids=PROMPT, max_new_tokens=12, temperature=0.9, top_k=4, seed=3)
    text = "".join(stream)
    again = decoder.generate(input_ids=PROMPT, max_new_tokens=12, temperature=0.9, top_k=4, seed=3)
    assert text == stream.result.text == again.text and stream.result.token_ids == again.token_ids


# ---------------------------------------------------------------- tests: bad input


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(seed=-1), "seed"), (dict(seed="abc"), "seed"), (dict(seed=2**64), "seed"),
])
def test_bad_sampling_arguments(setup, kwargs, needle):
    with pytest.raises(ChimeraError, match=needle):
        SamplingConfig(**kwargs)
    model, _ = setup
    with pytest.raises(ChimeraError, match=needle):
        SpeculativeDecoder(model, CharTokenizer()).generate(input_ids=PROMPT, max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("argv,needle", [
    (["--temperature", "-1"], "temperature"), (["--temperature", "warm"], "temperature"),
    (["--top-p", "0"], "top_p"), (["--top-p", "2"], "top_p"), (["--top-k", "-2"], "top_k"),
    (["--top-k", "1.5"], "top-k"), (["--seed", "x"], "seed"), (["--repetition-penalty", "1.1"], "repetition"),
])
def test_cli_rejects_bad_sampling_flags_before_loading(capsys, argv, needle):
    code = cli_main(["generate", "hi", "--model", "./no/such/model", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("chimera: error:") and needle in lines[0], err


def test_exact_laws_are_distributions(setup):
    """The exact laws the statistic compares against sum to one, on several tree shapes (the oracle's sanity)."""
    model, drafter = setup
    for paths in ([(0,)], [(0,), (1,), (2,), (3,)], [(0,), (0, 0), (0, 0, 0)]):
        tree = TreeBuffers.build(TreeTopology.from_paths(paths), "cpu")
        tokens = drafter.propose(None, torch.tensor([3]), tree)
        probs = torch.rand(tree.topology.size, V, dtype=torch.float64).softmax(-1)
        assert abs(sum(exact_step(tree, tokens, probs).values()) - 1) < 1e-9
    assert abs(sum(exact_continuations(model, CONFIGS["T1"]).values()) - 1) < 1e-9


TREES = [[(0,)], [(0,), (1,), (2,), (3,)], [(0,), (0, 0), (0, 0, 0)],
         [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_rule_s_exact_law_is_the_target_law(setup, name):
    """The proof, checked in float64 arithmetic: the law of one step of the rule, computed exactly from the
    acceptance probabilities and residuals it uses, equals the autoregressive law cut at the tree."""
    model, drafter = setup
    torch.manual_seed(0)
    wrong_tv = []
    for paths in TREES:
        tree = TreeBuffers.build(TreeTopology.from_paths(paths), "cpu")
        tokens = drafter.propose(None, torch.tensor([3]), tree)
        logits = 3 * torch.randn(tree.topology.size, V)
        logits[tree.parents[1:], tokens[1:]] += 3  # drafts the base likes, as from a good drafter
        probs = exact_probs(logits, CONFIGS[name])
        exact = exact_step(tree, tokens, probs)
        law = sample_accept_law(tree, tokens, probs)
        assert law.keys() == exact.keys()
        assert max(abs(law[k] - exact[k]) for k in law) < 1e-12
        wrong = without_residual_law(tree, tokens, probs)
        wrong_tv.append(0.5 * sum(abs(wrong.get(k, 0) - exact.get(k, 0)) for k in wrong.keys() | exact.keys()))
    assert max(wrong_tv) > 0.05, wrong_tv  # while the wrong rule's law is not
