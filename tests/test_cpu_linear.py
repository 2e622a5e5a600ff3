"""Prepacked oneDNN linear layers (cpu_linear) and the growing KV cache: the same numbers as the stock ones."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chimera import attention, cache as kv, cpu_linear, target
from chimera.cpu_linear import PackedLinear
from chimera.drafters import pack_for_cpu, new_drafter
from chimera.generate import SpeculativeDecoder
from conftest import FAMILIES, tiny_model

pytestmark = pytest.mark.skipif(not cpu_linear.ONEDNN, reason="this PyTorch has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear_for_any_rows_and_shape(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    with torch.inference_mode():
        for shape in [(1, 96), (5, 96), (17, 96), (1, 7, 96), (2, 3, 96), (96,)]:
            x = torch.randn(shape)
            torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
        x = torch.randn(96, 6).T  # not contiguous
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)


def test_packing_follows_in_place_changes_of_the_weight():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=False)
    packed = PackedLinear(linear)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        linear.weight.mul_(2)
    with torch.inference_mode():
        after = packed(x)
    torch.testing.assert_close(after, 2 * before, atol=1e-5, rtol=1e-5)
    linear.weight.data = torch.zeros_like(linear.weight)  # a new tensor behind the same parameter
    with torch.inference_mode():
        assert packed(x).abs().max() == 0


def test_gradients_flow_through_the_stock_route():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    packed = PackedLinear(nn.Linear(16, 8))
    packed.weight.data.copy_(linear.weight)
    packed.bias.data.copy_(linear.bias)
    x = torch.randn(4, 16)
    linear(x).square().sum().backward()
    packed(x).square().sum().backward()
    torch.testing.assert_close(packed.weight.grad, linear.weight.grad)
    torch.testing.assert_close(packed.bias.grad, linear.bias.grad)


def test_other_dtypes_take_the_stock_route():
    linear = nn.Linear(16, 8).to(torch.bfloat16)
    packed = PackedLinear(linear)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_copy_shares_weights_and_leaves_the_model_alone(family):
    model = tiny_model(family)
    copy = cpu_linear.packed_copy(model)
    originals = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert {name: p.data_ptr() for name, p in copy.named_parameters()} == originals
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in copy.modules()) == sum(
        type(m) is nn.Linear for m in model.modules())
    ids = torch.randint(3, 128, (40,))
    ours = target.forward(copy, kv.new_cache(), ids)
    stock = target.forward(model, kv.new_cache(), ids)
    torch.testing.assert_close(ours.logits, stock.logits, atol=1e-5, rtol=1e-5)


def test_decoder_packs_a_copy_and_falls_back_when_memory_is_short(monkeypatch, caplog, default_model):
    _, tokenizer = default_model
    model = tiny_model("llama")
    decoder = SpeculativeDecoder(model, tokenizer, drafter=None, packed_linears=True)
    assert decoder.verifier.model is not model
    assert any(isinstance(m, PackedLinear) for m in decoder.verifier.model.modules())
    again = SpeculativeDecoder(model, tokenizer, drafter=None, packed_linears=True)
    assert again.verifier.model is decoder.verifier.model  # shared
    assert decoder.verifier.model.config._attn_implementation == attention.NAME  # packed from the verifying twin
    unpacked = SpeculativeDecoder(model, tokenizer, drafter=None, packed_linears=False)
    assert unpacked.verifier.model is attention.verifying_model(model)
    assert not any(isinstance(m, PackedLinear) for m in unpacked.verifier.model.modules())
    other = tiny_model("llama", seed=1)
    monkeypatch.setattr(cpu_linear, "available_memory", lambda: 1024)
    with caplog.at_level(logging.WARNING, logger="chimera"):
        short = SpeculativeDecoder(other, tokenizer, drafter=None, packed_linears=True)
    assert short.verifier.model is attention.verifying_model(other)
    assert "not enough free memory" in caplog.text


def test_packed_drafter_drafts_the_same_trees():
    model = tiny_model("llama")
    drafter, packed = (new_drafter("chimera", model, num_draft_heads=5).eval().requires_grad_(False)
                       for _ in range(2))
    gen = torch.Generator().manual_seed(3)
    for a, b in zip(drafter.parameters(), packed.parameters()):
        noise = 0.05 * torch.randn(a.shape, generator=gen)
        a.add_(noise)
        b.add_(noise)
    assert pack_for_cpu(packed)
    assert isinstance(packed.heads[0].fc1, PackedLinear) and isinstance(packed._frozen["lm_head"], PackedLinear)
    assert model.get_output_embeddings() is drafter._frozen["lm_head"]  # the base's own head is not replaced
    assert type(model.get_output_embeddings()) is nn.Linear and packed._frozen["lm_head"].weight is \
        model.get_output_embeddings().weight  # packing wrapped it for the drafter only, sharing its weight
    from chimera.tree import TreeBuffers, get_topology

    tree = TreeBuffers.build(get_topology("small", drafter, torch.device("cpu")), "cpu")
    tokens = torch.randint(3, 128, (30,))
    hidden = target.forward(model, kv.new_cache(), tokens).hidden
    root = torch.tensor([5])
    drafts = [d.propose(d.start(tokens, hidden), root, tree) for d in (drafter, packed)]
    assert torch.equal(drafts[0], drafts[1])


def test_growing_cache_reallocates_without_losing_the_sequence():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (kv.FIRST_CAPACITY + 40,))
    cache = kv.new_cache()
    out = target.forward(model, cache, ids[:300])
    for start in range(300, ids.numel(), 100):
        out = target.forward(model, cache, ids[start:start + 100])
    assert cache.get_seq_length() == ids.numel()
    assert cache.layers[0].key_buffer.shape[-2] >= ids.numel()
    fresh = target.forward(model, kv.new_cache(), ids)
    torch.testing.assert_close(out.logits[-1], fresh.logits[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers,head", [("packed", "packed"), ("stock", "linear"), ("stock", "few_rows")])
def test_auto_follows_the_measured_routes_and_stays_exact(monkeypatch, default_model, layers, head):
    from chimera import calibration
    from chimera.calibration import Routes

    _, tokenizer = default_model
    model = tiny_model("llama")
    monkeypatch.setattr(calibration, "linear_routes", lambda *args, **kwargs: Routes({}, layers, head))
    decoder = SpeculativeDecoder(model, tokenizer, drafter=None)
    packed = any(isinstance(m, PackedLinear) for m in decoder.verifier.model.modules())
    assert packed == (layers == "packed")
    assert decoder.verifier.head_route == head and head in decoder.verifier.describe()
    ids = [5, 9, 17, 3]
    x = torch.tensor([ids])
    ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20,
                         eos_token_id=sorted(decoder.eos_ids))
    assert decoder.generate(input_ids=ids, max_new_tokens=20).token_ids == ref[0, len(ids):].tolist()


def test_routes_are_measured_once_and_cached(tmp_path, monkeypatch):
    from chimera import calibration

    monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path))
    model = tiny_model("llama")
    first = calibration.linear_routes(model, torch.device("cpu"))
    assert first.layers in ("stock", "packed") and first.head in ("linear", "few_rows", "packed")
    assert first.ms[f"layers/{first.layers}"] == min(v for k, v in first.ms.items() if k.startswith("layers/"))
    assert first.ms[f"head/{first.head}"] == min(v for k, v in first.ms.items() if k.startswith("head/"))
    assert calibration.linear_routes(model, torch.device("cpu")) == first
