"""Cold/warm load time of the default model and tokens/s of our loop vs model.generate, same process.

Usage: python scripts/measure_load_and_speed.py [--drafter PATH|none] [--prompts N] [--max-new-tokens N]
"""

import argparse
import os
import tempfile
import time

import torch

import chimera
from chimera.cli import quiet_libraries


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as cold_cache:
        os.environ["CHIMERA_CACHE"] = cold_cache
        t = time.perf_counter()
        chimera.load_base("smollm2-135m-instruct")
        cold = time.perf_counter() - t
        t = time.perf_counter()
        model, tokenizer = chimera.load_base("smollm2-135m-instruct")
        warm = time.perf_counter() - t
    print(f"load: cold {cold:.1f} s (GGUF conversion), warm {warm:.1f} s")
    prompts = ["Explain why the sky is blue.", "Write a short poem about autumn.", "How do vaccines work?",
               "Give three tips for learning to code.", "What is the difference between a list and a tuple?",
               "Describe the water cycle.", "Summarize the plot of Romeo and Juliet."][: args.prompts]
    decoder = chimera.SpeculativeDecoder(model, tokenizer)
    decoder.generate(prompts[0], max_new_tokens=8)  # warm-up
    ours_tokens = ours_time = hf_tokens = hf_time = 0
    for prompt in prompts:
        r = decoder.generate(prompt, max_new_tokens=args.max_new_tokens)
        ours_tokens += r.new_tokens
        ours_time += r.seconds
        ids = torch.tensor([decoder.prepare(prompt)])
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=args.max_new_tokens)
        hf_time += time.perf_counter() - t
        hf_tokens += out.shape[1] - ids.shape[1]
    print(f"ours (autoregressive): {ours_tokens / ours_time:.1f} tokens/s over {ours_tokens} tokens")
    print(f"model.generate:        {hf_tokens / hf_time:.1f} tokens/s over {hf_tokens} tokens")


if __name__ == "__main__":
    main()
