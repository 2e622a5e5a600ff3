"""A Chimera drafter that reads the base's hidden states after chosen layers beside its final ones (EAGLE-3's
features from low, middle and high layers; issue #18): the forward that verifies returns them, every decoding path
stays plain decoding's, a batch's rows draft what the lone drafter drafts, a sequence moves between the batch and
decoding alone with them, and such a drafter trains, saves and loads, or is refused with a clear error."""

import json

import pytest
import torch

from chimera import ChimeraError, SpeculativeDecoder, cache as kv, target
from chimera.batch import DRAFT_DEPTH, RunningBatch
from chimera.drafters import load_any, new_drafter
from chimera.drafters.chimera import ChimeraDrafter
from chimera.train.trainer import TrainConfig, train
from chimera.verifier import SlotVerifier
from conftest import as_on_a_gpu, tiny_model
from test_batch import drain, with_references
from test_cli_errors import assert_one_line_error, run_cli
from test_row_drafting import lone_chains, row_chains
from test_training import make_samples

LAYERS = (0, 1)  # the embeddings and the first of the tiny models' two layers


def features_drafter(model, heads=4, layers=LAYERS):
    drafter = ChimeraDrafter.for_base(model, num_draft_heads=heads, feature_layers=layers)
    for head in drafter.heads:  # heads start as the identity; make them matter
        torch.nn.init.normal_(head.fc2.weight, std=0.2)
    return drafter.eval()


def test_the_verifying_forward_returns_the_chosen_layers_then_the_final_states():
    model = tiny_model("llama")
    tokens = torch.randint(3, 128, (9,))
    with torch.no_grad():
        states = model(tokens[None], output_hidden_states=True).hidden_states
    d = model.config.hidden_size
    hidden = target.forward(model, kv.new_cache(), tokens, features=LAYERS).hidden
    assert hidden.shape == (9, 3 * d)
    for part, index in enumerate([*LAYERS, -1]):
        assert torch.allclose(hidden[:, part * d:(part + 1) * d], states[index][0], atol=1e-6)
    assert torch.equal(target.forward(model, kv.new_cache(), tokens).hidden, hidden[:, -d:])
    drafter = features_drafter(model)
    assert drafter.feature_layers == LAYERS and torch.equal(drafter.final(hidden), hidden[:, -d:])
    assert drafter.fuse.in_features == 4 * d  # three states and the trigram encoding


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoding_with_feature_layers_is_generate_on_every_path(family, default_model):
    _, tokenizer = default_model
    model = tiny_model(family)
    drafter = features_drafter(model, heads=5)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (int(n),), generator=gen).tolist() for n in (4, 11, 17)]
    decoders = []
    for tree in ("small", "dynamic-12-3-4"):
        plain = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False)
        assert plain.verifier.features == LAYERS
        slotted = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False)
        slotted.verifier = SlotVerifier(model, graphs=False, features=LAYERS)  # what the GPU replays, eagerly
        compiled = SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False)
        compiled.verifier = SlotVerifier(model, graphs=False, compiled=True, backend="aot_eager",
                                         padded_prefill=True, features=LAYERS)  # the GPU's bfloat16 path
        queued = as_on_a_gpu(SpeculativeDecoder(model, tokenizer, drafter, tree=tree, adaptive=False))
        decoders += [plain, slotted, compiled, queued]
    for ids in prompts:
        x = torch.tensor([ids])
        expected = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32)
        for decoder in decoders:
            result = decoder.generate(input_ids=ids, max_new_tokens=32)
            assert result.token_ids == expected[0, len(ids):].tolist()
            assert sum(result.accepted) == result.new_tokens
    assert decoders[2].verifier.decoder.failure is None


def test_rows_with_feature_layers_draft_the_chains_they_draft_alone():
    model = tiny_model("llama")
    drafter = features_drafter(model, heads=3)
    gen = torch.Generator().manual_seed(1)
    sequences = []
    for n in (5, 17, 2, 9):
        prompt = torch.randint(3, model.config.vocab_size, (n,), generator=gen)
        with torch.no_grad():
            out = model(prompt[None], output_hidden_states=True)
        sequences.append((prompt, target.feature_states(out.hidden_states, LAYERS)[0],
                          out.logits[0, -1].argmax().reshape(1)))
    assert torch.equal(row_chains(drafter, sequences), lone_chains(drafter, sequences))


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["exact rows", "padded rows"])
def test_a_drafting_batch_with_feature_layers_decodes_each_sequence_as_alone(fixed_shapes, default_model):
    _, tokenizer = default_model
    model = tiny_model("qwen2")
    prompts, budgets, expected, _ = with_references(model, tokenizer, 7, {6: 20, 15: 9, 9: 14})
    batch = RunningBatch(model, tokenizer, max_batch=3, capacity=96, drafter=features_drafter(model, DRAFT_DEPTH),
                         adaptive=False, fixed_shapes=fixed_shapes)
    assert batch.features == LAYERS
    sequences, texts = {}, {}
    for name in ("p0", "p1"):
        sequences[name], texts[name] = batch.add(prompts[name], budgets[name])
    results = drain(batch, sequences, texts, [(3, "p2", (prompts["p2"], budgets["p2"]))])
    assert batch.hidden.shape[-1] == 3 * model.config.hidden_size
    for name in prompts:
        assert results[name].token_ids == expected[name].token_ids, name
    assert batch.counts.drafted > 0


def test_a_plain_batch_keeps_the_features_a_lone_decoder_reads_when_a_sequence_leaves(default_model):
    """The server's batch drafts nothing by default, but a member left alone continues speculatively with the
    decoder's drafter, from the hidden states the batch kept: the batch keeps what that drafter reads."""
    _, tokenizer = default_model
    model = tiny_model("llama")
    decoder = SpeculativeDecoder(model, tokenizer, features_drafter(model, heads=5), tree="small", adaptive=False)
    batch = RunningBatch(model, tokenizer, max_batch=2, capacity=96, features=decoder.verifier.features)
    prompt = [5, 9, 23, 41, 17, 60, 3]
    sequence, _ = batch.add(prompt, 30)
    other, _ = batch.add([7, 3, 11], 2)
    while not other.done:
        batch.step()
    batch.remove(other)
    progress = batch.progress_of(sequence)
    assert progress.verified_hidden.shape[-1] == 3 * model.config.hidden_size
    batch.remove(sequence)
    result = decoder.resume(progress)
    "".join(result)
    assert result.result.token_ids == decoder.generate(input_ids=prompt, max_new_tokens=30).token_ids


def test_a_drafter_with_feature_layers_trains_saves_and_loads(tmp_path, default_model):
    _, tokenizer = default_model
    model = tiny_model("llama")
    cfg = TrainConfig(steps=3, batch_size=2, max_len=64, roots_per_seq=8, depth=5, warmup_steps=1,
                      heldout_fraction=0.2, eval_every=2, save_every=10**6, cache_base=True, feature_layers=[1])
    train(model, make_samples(model), tmp_path / "run", cfg, resume=False, progress=False)
    drafter = load_any(tmp_path / "run" / "drafter", model)
    assert drafter.feature_layers == (1,)
    with pytest.raises(ChimeraError, match=r"layers \[1\] beside its final ones, but this run's --feature-layers"):
        train(model, make_samples(model), tmp_path / "other", TrainConfig(
            steps=1, batch_size=2, max_len=64, depth=5, init=str(tmp_path / "run" / "drafter")), progress=False)
    ids = [5, 9, 23, 41, 17]
    decoder = SpeculativeDecoder(model, tokenizer, drafter, tree="small", adaptive=False)
    x = torch.tensor([ids])
    expected = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16)
    assert decoder.generate(input_ids=ids, max_new_tokens=16).token_ids == expected[0, len(ids):].tolist()


def test_a_trained_drafter_grows_feature_layers_and_drafts_as_before(tmp_path):
    """--init from a drafter of the final states alone into one with feature layers: the new layers' fuse columns
    start at zero, everything else as saved, so the grown drafter's chains are the source's to the last logit."""
    model = tiny_model("llama")
    samples = make_samples(model)
    base = dict(steps=2, batch_size=2, max_len=64, roots_per_seq=8, depth=3, heldout_fraction=0, eval_every=100,
                cache_base=True)
    train(model, samples, tmp_path / "final", TrainConfig(lr=5e-3, **base), progress=False)
    # lr 0: the steps leave the starting weights as they were, so the export shows the start
    train(model, samples, tmp_path / "grown", TrainConfig(lr=0.0, feature_layers=list(LAYERS),
                                                          init=str(tmp_path / "final" / "drafter"), **base),
          progress=False)
    source = load_any(tmp_path / "final" / "drafter", model).eval()
    grown = load_any(tmp_path / "grown" / "drafter", model).eval()
    d = model.config.hidden_size
    assert grown.feature_layers == LAYERS and grown.fuse.in_features == 4 * d
    assert not grown.fuse.weight[:, :2 * d].any()
    assert torch.equal(grown.fuse.weight[:, 2 * d:], source.fuse.weight)
    tokens = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        states = model(tokens, output_hidden_states=True).hidden_states
        features = torch.cat([states[i] for i in [*LAYERS, -1]], dim=-1)
        roots = torch.tensor([[2, 5, 8]])
        expected = source(tokens, states[-1], 3, roots)
        got = grown(tokens, features, 3, roots)
    for a, b in zip([*expected[0], *expected[1]], [*got[0], *got[1]], strict=True):  # each depth's logits, then u
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ChimeraError, match=r"layers \[0, 1\] beside its final ones, but this run's --feature-layers "
                                           r"are \[1\]: give them all"):
        train(model, samples, tmp_path / "fewer", TrainConfig(feature_layers=[1], init=str(tmp_path / "grown" /
                                                                                            "drafter"), **base),
              progress=False)


def test_feature_layers_the_base_lacks_are_refused(tmp_path):
    model = tiny_model("llama")  # two layers: 0 and 1 may be read
    with pytest.raises(ChimeraError, match=r"layers \[2\].*0\.\.1"):
        features_drafter(model, layers=(1, 2))
    with pytest.raises(ChimeraError, match="medusa drafter reads the base's final hidden states only"):
        new_drafter("medusa", model, num_draft_heads=2, feature_layers=[1])
    features_drafter(model).save(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["feature_layers"] == list(LAYERS)
    for layers, message in [([0, 7], r"layers \[7\]"), ([1, 1], "distinct"), ([-1], "distinct layer numbers >= 0")]:
        (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "feature_layers": layers}))
        with pytest.raises(ChimeraError, match=message):
            load_any(tmp_path / "d", model)


@pytest.mark.parametrize("value", ["a,b", "1,1", "-2"])
def test_bad_feature_layers_on_the_command_line(capsys, tmp_path, value):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--feature-layers", value)
    assert_one_line_error(code, err, "feature-layers")
