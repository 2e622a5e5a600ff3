"""Shared fixtures: tiny random models of several families (built here, no downloads) and the real default."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama", "qwen2", "mistral", "gemma")

# chat prompts for the exactness tests on the real default model
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "Give me a recipe for pancakes.",
    "Why do cats purr?",
    "Describe a sunset in two sentences.",
    "What is photosynthesis?",
    "Name five famous painters and one work of each.",
]


def tiny_config(family: str, vocab_size: int = 128, attn: str = "sdpa", **overrides):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(overrides)
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
    elif family == "mistral":
        config = MistralConfig(**common, sliding_window=256)
    elif family == "gemma":
        config = GemmaConfig(**common, head_dim=16)
    else:
        raise ValueError(family)
    config._attn_implementation = attn
    return config


def tiny_model(family: str, seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model in float32 (converted once into the user cache)."""
    from chimera import load_base

    return load_base("smollm2-135m-instruct", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model):
    """A tiny random Llama that uses the default model's tokenizer and chat template, saved as an HF dir."""
    _, tokenizer = default_model
    model = tiny_model("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def as_on_a_gpu(decoder):
    """``decoder`` running what a GPU runs, eagerly: a slot cache and the drafter's fixed-shape functions (as
    GraphedDrafter replays them), so that greedy steps, speculative ones too, are launched before the one before
    them is read (chimera/steps.py)."""
    from chimera.drafters.graphs import GraphedDrafter
    from chimera.verifier import SlotVerifier

    decoder.verifier = SlotVerifier(decoder.model, graphs=False, features=decoder.verifier.features)
    if decoder.drafter is not None and hasattr(decoder.drafter, "propose_static"):
        decoder.drafter = GraphedDrafter(decoder.drafter, decoder.tree, capacity=decoder.limit, graphs=False)
    return decoder


@pytest.fixture(scope="session", autouse=True)
def run_cache(tmp_path_factory):
    """The run's own cache directory: the calibrations that tests measure (of models in temporary directories) are
    not left in the user's, where they piled up one file a run. Converted models and inductor's kernels are shared
    with the user's (links), so the default model is converted and the compiled tests' kernels built once, not once
    a run."""
    from chimera.models import cache_root

    path = tmp_path_factory.mktemp("chimera-cache")
    for shared in ("models", "inductor"):
        (cache_root() / shared).mkdir(parents=True, exist_ok=True)
        (path / shared).symlink_to(cache_root() / shared, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHIMERA_CACHE", str(path))
        yield path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory of the test's own (calibrations, converted models): nothing read from or left in the user's."""
    monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path))
    return tmp_path


def assert_decodes_like_generate(decoder, model, lengths=(3, 9), max_new_tokens: int = 24, seed: int = 5) -> None:
    """``decoder`` emits greedy ``generate``'s tokens on random prompts of each length of the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        x = torch.tensor([ids])
        ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(decoder.eos_ids))
        assert decoder.generate(input_ids=ids, max_new_tokens=max_new_tokens).token_ids == ref[0, n:].tolist(), n
