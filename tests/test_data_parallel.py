"""Data-parallel drafter training (torchrun + accelerate, gloo on this CPU): two processes train what one does.

Two processes with half the batch each follow one process's loss curve and reach its weights, within float
tolerance (the gradient is summed in another order); a two-process run stopped half-way resumes to the weights
of one that never stopped, exactly.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chimera.train.data import DistillStore
from test_training import write_prompts

TRAIN = ["--steps", "6", "--batch-size", "4", "--max-len", "96", "--roots-per-seq", "16", "--depth", "3",
         "--eval-every", "6", "--save-every", "3", "--heldout-fraction", "0.2", "--device", "cpu", "--lr", "3e-3",
         "--warmup-steps", "2"]


def distill(prompts, out, model_dir, processes: int):
    command = [sys.executable, "-m", "chimera.cli", "distill", "--prompts", str(prompts), "--out", str(out),
               "--model", str(model_dir), "--max-new-tokens", "24", "--batch-size", "3", "--device", "cpu",
               "--num-processes", str(processes)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model_dir):
    """The same prompts distilled by one process and by two (5 batches of 3 prompts: the second process gets one
    batch fewer); the data is identical, sample for sample."""
    root = tmp_path_factory.mktemp("dp")
    prompts = write_prompts(root / "p.jsonl", 14)
    assert json.loads(distill(prompts, root / "one", tiny_model_dir, 1).strip())["samples"] == 14
    printed = distill(prompts, root / "two", tiny_model_dir, 2).strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0])["samples"] == 14  # one summary, from the main process
    one, two = DistillStore(root / "one"), DistillStore(root / "two")
    assert [e["id"] for e in one.index] == [e["id"] for e in two.index]  # the same order, too
    for (t1, m1), (t2, m2) in zip(one.load(), two.load(), strict=True):
        assert t1.tolist() == t2.tolist() and m1.tolist() == m2.tolist()
    return root / "two", tiny_model_dir


def train(data, model_dir, out, processes: int, *extra: str):
    command = [sys.executable, "-m", "chimera.cli", "train", "--data", str(data), "--out", str(out), "--model",
               str(model_dir), "--num-processes", str(processes), *TRAIN, *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(run) -> dict:
    return load_file(str(run / "drafter" / "model.safetensors"))


def test_two_processes_train_what_one_does_and_resume_exactly(distilled, tmp_path):
    data, model_dir = distilled
    one = train(data, model_dir, tmp_path / "one", 1)
    two = train(data, model_dir, tmp_path / "two", 2)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]  # one log, written once (by the main process)
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])
    assert one[-1]["heldout"]["top1"] == pytest.approx(two[-1]["heldout"]["top1"], abs=0.02)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-5, msg=key)

    train(data, model_dir, tmp_path / "resumed", 2, "--stop-after", "3")  # "killed" after its step-3 checkpoint
    assert not (tmp_path / "resumed" / "drafter").exists()
    resumed = train(data, model_dir, tmp_path / "resumed", 2)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    w3 = weights(tmp_path / "resumed")
    for key in w2:
        assert torch.equal(w2[key], w3[key]), key
