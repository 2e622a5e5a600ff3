"""What one decoding step costs on realistic sizes, against the memory-bandwidth floor (GPU, bfloat16).

Builds random-weight Llama shapes (timings do not depend on the weights; the vocabulary is the default model's,
49,152 tokens, so its tokenizer serves) and reports per shape: the bandwidth floor of one forward (weight bytes
over the GPU's rated bandwidth, and over the bandwidth a device copy reaches here), our plain step (ms and % of
the rated bandwidth) with the decoder compiled and without, ``hf-compiled``'s time per token, the speculative
step split (draft / verify / other) with a 64-node dynamic tree of 8 levels, the drafter's drafting compiled or not, r, and the speedup a drafter of a
given tau would give (tau / r). The drafter is random: it measures cost, not acceptance.

Usage (on the GPU machine):
    python scripts/step_cost_probe.py --shapes 1b 8b --out docs/step_cost_probe_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import chimera
from chimera.bench.methods import Decoding, HFGenerate, warm_up_static
from chimera.cli import quiet_libraries
from chimera.drafters.chimera import ChimeraDrafter
from chimera.tree import DynamicTree
from report_json import save_json

SHAPES = {  # Llama 3.2 1B and Llama 3 8B, with the default model's vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
RATED_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, the vendors' figures (SXM)
TAUS = (2.0, 3.0, 4.0)


def copy_bandwidth(device) -> float:
    """Bytes per second a large device-to-device copy moves (read + write)."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 10 * 2 * x.numel() / (time.perf_counter() - t0)


def build(shape: str, vocab_size: int, device) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, rope_theta=500000.0,
                         **SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


CONFIGS = {  # name: (the base's forward compiled, the drafter's drafting compiled)
    "graphs": (False, False), "compiled": (True, False), "compiled_drafter": (True, True)}


def our_steps(model, tokenizer, drafter, prompt: list[int], new_tokens: int, compile: bool,
              compile_drafter: bool = False) -> dict:
    """ms per step of our loop, split as the loop times it (synchronised), after a warm-up that captures."""
    tree = DynamicTree(size=64, depth=8, beam=8) if drafter is not None else "auto"
    decoder = chimera.SpeculativeDecoder(model, tokenizer, drafter, tree=tree, sync_timing=True, adaptive=False,
                                         compile=compile, compile_drafter=compile_drafter)
    t0 = time.perf_counter()
    decoder.generate(input_ids=prompt, max_new_tokens=16)  # captures (and compiles) every shape it needs
    warm = time.perf_counter() - t0
    r = decoder.generate(input_ids=prompt, max_new_tokens=new_tokens)
    steps = r.steps - 1
    split = {k: round(1000 * getattr(r, f"time_{k}") / steps, 3) for k in ("draft", "verify", "other")}
    return {"ms_per_step": round(1000 * (r.seconds - r.time_prefill) / steps, 3), "split": split,
            "steps": steps, "warm_up_s": round(warm, 1), "forward": decoder.verifier.describe()}


def hf_compiled_ms(model, tokenizer, prompt: list[int], new_tokens: int) -> dict:
    method = HFGenerate(model, tokenizer, static=True, decoding=Decoding())
    t0 = time.perf_counter()
    warm_up_static(method, 16)
    warm = time.perf_counter() - t0
    turn = method(prompt, new_tokens)
    return {"ms_per_token": round(1000 * turn.seconds / len(turn.token_ids), 3), "warm_up_s": round(warm, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-hf", action="store_true", help="skip hf-compiled (its compilation takes minutes)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="graphs: op by op in CUDA graphs; compiled: the base's forward compiled; compiled_drafter: "
                        "the drafter's levels compiled too (default: all)")
    p.add_argument("--plain-only", action="store_true", help="our plain step only (no drafter, no tree)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    quiet_libraries()
    device = torch.device("cuda")
    _, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="bfloat16", device="cpu")
    name = torch.cuda.get_device_name(device)
    rated = next((v for k, v in RATED_BANDWIDTH.items() if k in name), None)
    copied = copy_bandwidth(device)
    report = {"device": name, "torch": torch.__version__, "rated_bandwidth_TBps": rated and rated / 1e12,
              "copy_bandwidth_TBps": round(copied / 1e12, 2), "shapes": {}}
    prompt = (torch.arange(args.prompt_tokens) % 1000 + 100).tolist()
    report["inductor_settings"] = {k: v for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_")}
    for shape in args.shapes:
        model = build(shape, len(tokenizer), device)
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        row = {"parameters_M": round(sum(t.numel() for t in model.parameters()) / 1e6, 1),
               "weight_GB": round(weight_bytes / 1e9, 3),
               "floor_ms_rated": rated and round(1000 * weight_bytes / rated, 3),
               "floor_ms_copy": round(1000 * weight_bytes / copied, 3)}
        drafter = ChimeraDrafter.for_base(model, num_draft_heads=8).to(device=device, dtype=torch.bfloat16).eval()
        row["drafter_parameters_M"] = round(sum(t.numel() for t in drafter.parameters()) / 1e6, 1)
        for tag in args.configs:
            compile, compile_drafter = CONFIGS[tag]
            plain = our_steps(model, tokenizer, None, prompt, args.new_tokens, compile)
            row[tag] = {"plain": plain}
            if not args.plain_only:
                spec = our_steps(model, tokenizer, drafter, prompt, args.new_tokens, compile, compile_drafter)
                r = spec["ms_per_step"] / plain["ms_per_step"]
                row[tag].update({"speculative_64_nodes": spec, "r": round(r, 3),
                                 "verify_over_plain": round(spec["split"]["verify"] / plain["ms_per_step"], 3),
                                 "speedup_at_tau": {str(t): round(t / r, 2) for t in TAUS}})
            if rated:
                row[tag]["plain_bandwidth_pct"] = round(100 * weight_bytes / rated / (plain["ms_per_step"] / 1000), 1)
            print(shape, tag, json.dumps(row[tag]), flush=True)
        if not args.no_hf:
            row["hf_compiled"] = hf_compiled_ms(model, tokenizer, prompt, args.new_tokens)
            print(shape, "hf-compiled", json.dumps(row["hf_compiled"]), flush=True)
        report["shapes"][shape] = row
        del model, drafter
        torch.cuda.empty_cache()
        save_json(report, args.out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
