"""Self-distillation and drafter training: end to end on CPU, crash-safe resume, bad input."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from chimera import ChimeraError, SpeculativeDecoder, load_base
from chimera.cli import main
from chimera.drafters import load_any, persist
from chimera.train import distill as distill_mod
from chimera.train.data import DistillStore, Prompt, count_tokens, read_prompts
from chimera.train.trainer import TrainConfig, latest_checkpoint, train
from chimera.tree import TreeTopology
from conftest import tiny_model
from test_drafter import perturbed_drafter


def write_prompts(path, n, extra_lines=()):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "prompt": f"Question number {i}: say something about {i * 7}."}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_end_to_end_distill_train_decode(tmp_path, tiny_model_dir, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 6, extra_lines=["{not json", json.dumps({"no_prompt": 1})])
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["distill", "--prompts", str(prompts), "--out", str(data), "--model", str(tiny_model_dir),
                 "--max-new-tokens", "24", "--batch-size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "skipped 2 malformed" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["samples"] == 6
    assert main(["train", "--data", str(data), "--out", str(run), "--model", str(tiny_model_dir),
                 "--steps", "6", "--batch-size", "2", "--max-len", "96", "--roots-per-seq", "16", "--depth", "3",
                 "--eval-every", "3", "--save-every", "3", "--heldout-fraction", "0.2", "--device", "cpu"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert len(log[-1]["heldout"]["top1"]) == 3
    model, tokenizer = load_base(str(tiny_model_dir), device="cpu")
    size = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["size"]  # the drafter against its base
    assert size["base_parameters"] == sum(p.numel() for p in model.parameters())
    assert size["drafter_to_base"] == round(size["drafter_parameters"] / size["base_parameters"], 4)
    assert size["inference_table_elements"] == 3 * (model.config.vocab_size + 1) * model.config.hidden_size
    drafter = load_any(run / "drafter", model)
    odds = json.loads((run / "drafter" / "config.json").read_text())["acceptance_odds"]
    assert odds == log[-1]["heldout"]["acceptance_odds"]  # the last evaluation's lines, loaded as they were saved
    assert drafter.acceptance_odds == (None if odds is None else [tuple(line) for line in odds])
    decoder = SpeculativeDecoder(model, tokenizer, drafter, tree=TreeTopology.chain(3))
    for prompt in ["hello there", "what is two plus two"]:
        ids = decoder.prepare(prompt)
        x = torch.tensor([ids])
        ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=30)
        assert decoder.generate(prompt, max_new_tokens=30).token_ids == ref[0, len(ids):].tolist()


def test_distill_resumes_after_a_crash_without_loss_or_duplicates(tmp_path, tiny_model_dir, monkeypatch):
    model, tokenizer = load_base(str(tiny_model_dir), device="cpu")
    prompts = [Prompt(str(i), f"prompt {i} about {i * 3}") for i in range(7)]
    clean = distill_mod.distill(model, tokenizer, prompts, tmp_path / "clean", max_new_tokens=12, batch_size=2,
                                progress=False)
    assert clean["samples"] == 7

    crashed = tmp_path / "crashed"
    real_append = DistillStore.append
    calls = {"n": 0}

    def dying_append(self, sample_id, tokens, mask):
        calls["n"] += 1
        if calls["n"] == 4:  # killed mid-write: tokens hit the disk, the index line only half
            with (self.dir / "tokens.bin").open("ab") as f:
                f.write(np.asarray(tokens, dtype=np.uint32).tobytes())
            with (self.dir / "index.jsonl").open("a") as f:
                f.write('{"id": "half')
            raise KeyboardInterrupt
        return real_append(self, sample_id, tokens, mask)

    monkeypatch.setattr(DistillStore, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        distill_mod.distill(model, tokenizer, prompts, crashed, max_new_tokens=12, batch_size=2, progress=False)
    monkeypatch.setattr(DistillStore, "append", real_append)
    assert len(DistillStore(crashed)) == 3
    resumed = distill_mod.distill(model, tokenizer, prompts, crashed, max_new_tokens=12, batch_size=2,
                                  progress=False)
    assert resumed["samples"] == 7 and resumed["new"] == 4
    a, b = DistillStore(tmp_path / "clean"), DistillStore(crashed)
    assert sorted(e["id"] for e in b.index) == sorted(e["id"] for e in a.index)
    by_id = lambda store: {e["id"]: s for e, s in zip(store.index, store.load())}  # noqa: E731
    clean_samples, crashed_samples = by_id(a), by_id(b)
    for key in clean_samples:
        assert np.array_equal(clean_samples[key][0], crashed_samples[key][0])
        assert np.array_equal(clean_samples[key][1], crashed_samples[key][1])


def make_samples(model, n=6, length=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        tokens = torch.randint(3, 128, (length,), generator=gen).numpy()
        mask = np.zeros(length, dtype=bool)
        mask[length // 3:] = True
        samples.append((tokens, mask))
    return samples


def test_train_resume_continues_exactly(tmp_path):
    model = tiny_model("llama")
    samples = make_samples(model)
    cfg = TrainConfig(steps=6, batch_size=2, max_len=64, roots_per_seq=8, depth=3, lr=5e-3, warmup_steps=2,
                      heldout_fraction=0, eval_every=100, save_every=2)
    train(model, samples, tmp_path / "straight", cfg, progress=False)
    train(model, samples, tmp_path / "resumed", cfg, progress=False, max_steps_this_run=3)  # "killed" at 3
    checkpoint = latest_checkpoint(tmp_path / "resumed")
    assert checkpoint.name == "step-0000003"
    assert not (tmp_path / "resumed" / "drafter").exists()
    train(model, samples, tmp_path / "resumed", cfg, progress=False)
    from safetensors.torch import load_file

    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "straight" / "step-0000006" / name))
        b = load_file(str(tmp_path / "resumed" / "step-0000006" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    log = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]


def test_the_default_window_holds_the_longest_sample(tmp_path):
    model = tiny_model("llama")
    samples = make_samples(model, n=4, length=40) + make_samples(model, n=2, length=70, seed=1)
    cfg = TrainConfig(steps=2, batch_size=2, roots_per_seq=8, depth=2, heldout_fraction=0, eval_every=100)
    assert cfg.max_len is None
    train(model, samples, tmp_path / "run", cfg, progress=False)
    config = json.loads((tmp_path / "run" / "drafter" / "config.json").read_text())
    assert config["training"]["max_len"] == 70
    # the number is what the run saved: the same command, or the number given, resumes it; another is refused
    train(model, samples, tmp_path / "run", cfg, progress=False)
    train(model, samples, tmp_path / "run", replace(cfg, max_len=70), progress=False)
    with pytest.raises(ChimeraError, match="max_len"):
        train(model, samples, tmp_path / "run", replace(cfg, max_len=64), progress=False)


def test_train_refuses_other_settings_in_the_same_run_directory(tmp_path):
    model = tiny_model("llama")
    samples = make_samples(model)
    cfg = TrainConfig(steps=2, batch_size=2, max_len=64, roots_per_seq=8, depth=2, heldout_fraction=0,
                      save_every=1)
    train(model, samples, tmp_path / "run", cfg, progress=False, max_steps_this_run=1)
    with pytest.raises(ChimeraError, match="other settings"):
        train(model, samples, tmp_path / "run", TrainConfig(**{**cfg.__dict__, "lr": 0.5}), progress=False)


def test_init_starts_from_a_saved_drafter_and_adds_heads(tmp_path):
    """--init: every weight comes from the saved drafter, and each extra head starts as its last head."""
    from safetensors.torch import load_file

    model = tiny_model("llama")
    samples = make_samples(model)
    base = dict(steps=2, batch_size=2, max_len=64, roots_per_seq=8, heldout_fraction=0, eval_every=100)
    train(model, samples, tmp_path / "two", TrainConfig(depth=2, lr=5e-3, **base), progress=False)
    source = load_file(str(tmp_path / "two" / "drafter" / "model.safetensors"))
    counts = load_file(str(tmp_path / "two" / "drafter" / "token_counts.safetensors"))["counts"]
    assert counts.tolist() == count_tokens(samples, model.config.vocab_size).tolist()  # what the base wrote
    assert int(counts.sum()) == sum(int(m.sum()) for _, m in samples)
    # lr 0: the steps leave the starting weights as they were, so the export shows the start
    train(model, samples, tmp_path / "four", TrainConfig(depth=4, lr=0.0, init=str(tmp_path / "two" / "drafter"),
                                                         **base), progress=False)
    grown = load_file(str(tmp_path / "four" / "drafter" / "model.safetensors"))
    assert {k for k in grown if not k.startswith("heads.")} == {k for k in source if not k.startswith("heads.")}
    for key, value in grown.items():
        if key.startswith("heads."):
            _, index, rest = key.split(".", 2)
            expected = source[f"heads.{min(int(index), 1)}.{rest}"]
        else:
            expected = source[key]
        assert torch.equal(value, expected), key
    config = json.loads((tmp_path / "four" / "drafter" / "config.json").read_text())
    assert config["num_draft_heads"] == 4 and config["training"]["init"] == str(tmp_path / "two" / "drafter")

    with pytest.raises(ChimeraError, match="has 4 heads, more than --depth 3"):
        train(model, samples, tmp_path / "three", TrainConfig(depth=3, init=str(tmp_path / "four" / "drafter"), **base),
              progress=False)
    with pytest.raises(ChimeraError, match="is a ChimeraDrafter, but this run trains a MedusaDrafter"):
        train(model, samples, tmp_path / "medusa", TrainConfig(depth=4, architecture="medusa",
                                                               init=str(tmp_path / "two" / "drafter"), **base),
              progress=False)
    assert not (tmp_path / "three" / "drafter").exists() and not (tmp_path / "medusa" / "drafter").exists()


def test_prompt_file_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ChimeraError, match="is empty"):
        read_prompts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n[1, 2]\n" + json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ChimeraError, match="no valid lines"):
        read_prompts(bad)
    with pytest.raises(ChimeraError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
    mixed = write_prompts(tmp_path / "mixed.jsonl", 3, extra_lines=["nope", json.dumps({"id": 0, "prompt": "dup"})])
    prompts, skipped = read_prompts(mixed)
    assert len(prompts) == 3 and skipped == 2


def test_data_directory_of_another_base_is_refused(tmp_path, tiny_model_dir, capsys):
    model, tokenizer = load_base(str(tiny_model_dir), device="cpu")
    prompts = [Prompt("a", "hello"), Prompt("b", "world")]
    distill_mod.distill(model, tokenizer, prompts, tmp_path / "data", max_new_tokens=4, progress=False)
    other = tiny_model("llama", seed=5, vocab_size=len(tokenizer))
    with pytest.raises(ChimeraError, match="holds data made with base"):
        distill_mod.distill(other, tokenizer, prompts, tmp_path / "data", max_new_tokens=4, progress=False)
    store = DistillStore(tmp_path / "data")
    with pytest.raises(ChimeraError, match="the data was made with base"):
        train(other, store.load(), tmp_path / "run", TrainConfig(steps=1), data_meta=store.meta, progress=False)
    with pytest.raises(ChimeraError, match="max_new_tokens"):
        distill_mod.distill(model, tokenizer, prompts, tmp_path / "data", max_new_tokens=8, progress=False)
    assert len(DistillStore(tmp_path / "data")) == 2  # untouched


def test_unwritable_output_paths(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    code = main(["distill", "--prompts", str(prompts), "--out", str(blocker / "data"), "--model",
                 "smollm2-135m-instruct", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to" in err and "Traceback" not in err
    model = tiny_model("llama")
    with pytest.raises(ChimeraError, match="cannot write to"):
        train(model, make_samples(model), blocker / "run", TrainConfig(steps=1), progress=False)
    assert blocker.read_text() == "not a directory"


def test_train_on_a_directory_that_is_not_data(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "not a chimera data directory" in capsys.readouterr().err


def test_answers_to_one_prompt_are_held_out_together():
    """Greedy and sampled answers to the same prompts, trained on together: a prompt's answers all train or are all
    held out, about the fraction asked of the prompts; without groups the split is by sample, as always."""
    from chimera.train.trainer import split_heldout

    groups = [str(i) for i in range(50)] * 2  # two stores' answers to the same 50 prompts
    kept, held = split_heldout(len(groups), 0.2, 0, groups)
    assert sorted([*kept, *held]) == list(range(100))
    held_names = {groups[i] for i in held}
    assert len(held_names) == 10 and len(held) == 20
    assert not held_names & {groups[i] for i in kept}
    kept, held = split_heldout(len(groups), 0.2, 0)  # by sample: 20 held out, some with a twin in training
    assert len(held) == 20 and {groups[i] for i in held} & {groups[i] for i in kept}


def test_training_on_greedy_and_sampled_answers_together(tmp_path, tiny_model_dir, capsys):
    """``chimera train --data GREEDY SAMPLED``: both stores' samples trained on, each prompt's answers on one side of
    the held-out split, both directories recorded in the drafter's config; a store of another base refused."""
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    greedy, sampled, run = tmp_path / "greedy", tmp_path / "sampled", tmp_path / "run"
    common = ["--prompts", str(prompts), "--model", str(tiny_model_dir), "--max-new-tokens", "16", "--batch-size",
              "3", "--device", "cpu"]
    assert main(["distill", "--out", str(greedy), *common]) == 0
    assert main(["distill", "--out", str(sampled), "--temperature", "1.0", "--seed", "3", *common]) == 0
    assert len(DistillStore(greedy)) == len(DistillStore(sampled)) == 6
    capsys.readouterr()
    args = ["--out", str(run), "--model", str(tiny_model_dir), "--steps", "2", "--batch-size", "2", "--max-len", "64",
            "--roots-per-seq", "8", "--depth", "2", "--eval-every", "2", "--save-every", "2", "--heldout-fraction",
            "0.34", "--device", "cpu"]
    assert main(["train", "--data", str(greedy), str(sampled), *args]) == 0
    config = json.loads((run / "drafter" / "config.json").read_text())
    assert config["training"]["data"] == [str(greedy), str(sampled)]
    # a store made with another base: one line naming both directories, nothing trained
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((greedy / "meta.json").read_text())
    meta["base"] = {**meta["base"], "hidden_size": meta["base"]["hidden_size"] + 1}
    (other / "meta.json").write_text(json.dumps(meta))
    for name in ("index.jsonl", "tokens.bin", "mask.bin"):
        (other / name).write_bytes((greedy / name).read_bytes())
    code = main(["train", "--data", str(greedy), str(other), *args[:1], str(tmp_path / "run2"), *args[2:]])
    err = capsys.readouterr().err
    assert code == 2 and "train on the data of one base" in err and str(other) in err and "Traceback" not in err
    assert not (tmp_path / "run2").exists()


def test_evaluation_in_passes_of_roots_is_the_evaluation_of_every_root_at_once():
    """evaluate() sends a sample's chains through the drafter some roots at a time (its memory, not its result): the
    counts are those of every root in one pass, whatever the pass size."""
    from chimera.train.trainer import evaluate

    model = tiny_model("llama")
    samples = make_samples(model, n=5, length=37)
    drafter = perturbed_drafter(model, heads=3)
    cfg = TrainConfig(batch_size=2, max_len=64, depth=3, roots_per_seq=8)
    ids = np.arange(len(samples))
    with torch.no_grad():
        at_once = evaluate(model, drafter, samples, ids, cfg, drafter.pad_id, "cpu", roots_per_pass=64)
        results = [evaluate(model, drafter, samples, ids, cfg, drafter.pad_id, "cpu", roots_per_pass=n)
                   for n in (None, 5)]
    assert at_once["chains"][0] > 0 and 0 < at_once["top1"][0] < 1
    lines = at_once["acceptance_odds"]  # fitted where a depth had enough candidates, in the form a drafter loads
    assert lines and persist.acceptance_odds({"acceptance_odds": lines}, heads=3) == [tuple(line) for line in lines]
    for result in results:
        assert result == at_once
