"""Where a plain decoding step's time goes on this CPU, ours against ``generate``'s, on a random-weight model of
the default model's shape (SmolLM2-135M: timings do not depend on the weights, so no model file is needed).

Per step at a 200-token context: the decoder's forward (stock and oneDNN-prepacked linear layers), the vocabulary
projection by each route we have (``F.linear``, the few-rows product of target.weight_logits, prepacked), our whole
plain step (target.forward on our growing cache, per route), and ``generate``'s time per token.

Usage: OMP_NUM_THREADS=2 python scripts/cpu_step_profile.py [--out FILE.json]
"""

import argparse
import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chimera import cache as kv, cpu_linear, target
from chimera.calibration import median_ms, processor_name
from report_json import print_and_save

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=None, pad_token_id=0)


def ms(fn, repeats=20) -> float:
    with torch.inference_mode():
        return round(median_ms(fn, repeats, warmup=3), 2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    packed = cpu_linear.packed_copy(model)
    prompt = torch.randint(100, 40000, (200,))
    report = {"processor": processor_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine()}
    for name, m in (("stock", model), ("packed", packed)):
        cache = kv.new_cache()
        target.forward(m, cache, prompt, logits_to_keep=1)
        token = torch.tensor([5])
        decoder = m.get_decoder()

        def step():
            target.forward(m, cache, token)
            kv.keep_path(cache, cache.get_seq_length() - 1, torch.zeros(0, dtype=torch.long))

        def decoder_only():
            from chimera.cache_argument import cache_kwargs

            decoder(input_ids=token[None], position_ids=torch.tensor([[cache.get_seq_length()]]), use_cache=True,
                    **cache_kwargs(decoder, cache))
            kv.keep_path(cache, cache.get_seq_length() - 1, torch.zeros(0, dtype=torch.long))

        report[f"our_plain_step_ms_{name}"] = ms(step)
        report[f"decoder_forward_ms_{name}"] = ms(decoder_only)
    z = torch.randn(1, SHAPE["hidden_size"])
    weight = model.get_output_embeddings().weight
    packed_head = cpu_linear.PackedLinear(model.get_output_embeddings())
    report["head_ms_F_linear"] = ms(lambda: torch.nn.functional.linear(z, weight))
    report["head_ms_few_rows"] = ms(lambda: target.weight_logits(z, weight))
    report["head_ms_packed"] = ms(lambda: packed_head(z))
    x = prompt[None]
    new = 64
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8)
        start = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new, min_new_tokens=new)
        total = time.perf_counter() - start
    prefill = ms(lambda: model(x, logits_to_keep=1), repeats=3)
    report["generate_ms_per_token"] = round((1000 * total - prefill) / (new - 1), 2)
    print_and_save(report, args.out)


if __name__ == "__main__":
    main()
