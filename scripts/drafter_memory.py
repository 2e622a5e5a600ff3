"""How much memory a Chimera drafter takes beside its base, per base shape: its own parameters (the base's
embeddings and vocabulary head are shared, not counted) and the trigram tables a CPU precomputes (3 x vocabulary x
hidden; a GPU keeps none, ChimeraDrafter.prepare_inference). Counted on the meta device from configs: nothing is
allocated, so the 8B shape runs on any machine. ``--time``: also what the tables save on this machine's CPU: the
trigram encoding of one drafting level (6 nodes, and 1 and 64) through them and computed directly, for the default
model's shipped drafter in float32.

    python scripts/drafter_memory.py [--heads 8] [--time]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chimera.drafters.chimera import ChimeraConfig, ChimeraDrafter
from step_cost_probe import SHAPES as LLAMA_SHAPES

LLAMA_3_VOCABULARY = 128256
SHAPES = {  # the default model (SmolLM2-135M); the step-cost probe's Llama 3.2 1B and Llama 3 8B, with their own
    # vocabulary here (the probe gives them the default model's)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": {**LLAMA_SHAPES["1b"], "vocab_size": LLAMA_3_VOCABULARY},
    "llama-8b": {**LLAMA_SHAPES["8b"], "vocab_size": LLAMA_3_VOCABULARY},
}


def encoding_ms() -> dict:
    """ms of the trigram encoding of n nodes, through the tables and directly, on this CPU (median of 5 x 200)."""
    import chimera
    from chimera.drafters import resolve_drafter

    model, _ = chimera.load_base("smollm2-135m-instruct", dtype="float32", device="cpu")
    drafter = resolve_drafter("auto", model)
    drafter.prepare_inference()
    report = {}
    with torch.inference_mode():
        for n in (1, 6, 64):
            tokens = torch.randint(0, drafter.config.vocab_size, (3, n))
            for name, encode in (("tables", drafter.trigram_lookup), ("direct", drafter.trigram)):
                runs = []
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(200):
                        encode(*tokens)
                    runs.append((time.perf_counter() - start) / 200 * 1e3)
                report[f"{n} nodes, {name}"] = round(sorted(runs)[2], 3)
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--time", action="store_true")
    args = p.parse_args()
    rows = {}
    for name, shape in SHAPES.items():
        with torch.device("meta"):
            base = LlamaForCausalLM(LlamaConfig(**shape))
            config = ChimeraConfig.from_base(base, num_draft_heads=args.heads, identity=False)
            drafter = ChimeraDrafter(config, base.get_input_embeddings(), base.get_output_embeddings())
        own = sum(p.numel() for p in drafter.parameters())
        weights = sum(p.numel() for p in base.parameters())
        tables = 3 * (config.vocab_size + 1) * config.hidden_size
        rows[name] = {"base_parameters": weights, "drafter_parameters": own, "drafter_to_base": round(own / weights, 4),
                      "cpu_table_elements": tables, "cpu_tables_to_base": round(tables / weights, 4)}
        print(f"{name}: drafter {own / 1e6:.1f}M parameters, {own / weights:.1%} of the base's {weights / 1e6:.0f}M; "
              f"a CPU's trigram tables {tables / 1e6:.1f}M elements more ({tables / weights:.1%})")
    if args.time:
        rows["encoding_ms_this_cpu"] = encoding_ms()
        print("trigram encoding, ms:", rows["encoding_ms_this_cpu"])
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
