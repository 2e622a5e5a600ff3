"""On a GPU: does one compilation per tree size serve every slot-cache capacity, at the speed of a compilation for
one capacity? A random-weight model of the default model's shape (no files needed), bfloat16.

For tree sizes 1 and 64 and capacities 256, 512 and 1024 it captures the compiled slot forward (capacity a symbol,
as SlotBank does) and reports the seconds each first capture took, the ms per replayed forward, and the largest
logit difference from the uncompiled graphs; then the same forward compiled for one capacity only (the capacity a
constant) for comparison.

Usage: python scripts/device/capacity_compile_check.py > capacity_compile_check.json
"""

import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chimera.compiled import CompiledDecoder
from chimera.graph_runner import GraphRunner
from chimera.tree import TreeBuffers, TreeTopology
from chimera.verifier import SlotBank

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def replay_ms(bank, tokens, tree, repeats=200) -> float:
    bank.score(tokens, tree)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        bank.score(tokens, tree)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / repeats


def main():
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
    prompt = torch.randint(100, 1000, (100,), device=device)  # room for a 64-node tree in 256 slots
    rows = []
    for label, static in (("symbolic capacity", False), ("one capacity", True)):
        decoder = CompiledDecoder(model)
        if static:
            decoder.mark_capacity = lambda tensor, dim: None  # this check's comparison: no symbol
        compiled_runner, eager_runner = GraphRunner(graphs=True), GraphRunner(graphs=True)
        for n in (1, 64):
            tree = TreeBuffers.build(TreeTopology.chain(n - 1), device)
            tokens = torch.randint(100, 1000, (n,), device=device)
            for capacity in ((512,) if static else (256, 512, 1024)):
                banks = [SlotBank(model, capacity, device, compiled_runner, decoder),
                         SlotBank(model, capacity, device, eager_runner, None)]
                for bank in banks:
                    bank.prefill(prompt)
                t0 = time.perf_counter()
                fast = banks[0].score(tokens, tree).logits.clone()
                first = time.perf_counter() - t0
                slow = banks[1].score(tokens, tree).logits
                rows.append({"compiled for": label, "tree": n, "capacity": capacity, "first_call_s": round(first, 1),
                             "ms": round(replay_ms(banks[0], tokens, tree), 3),
                             "uncompiled_ms": round(replay_ms(banks[1], tokens, tree), 3),
                             "max_logit_diff": float((fast - slow).abs().max())})
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
