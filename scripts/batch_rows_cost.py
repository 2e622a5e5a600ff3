"""How a running batch's plain forward grows with its rows, compiled or not, on a small random Llama (any device).

Written for the KV write of chimera/cache.py's RowSlotLayer: through torch.compile, a scatter into a slice of the
cache's buffer became a functional copy of those rows' keys and values (and of the whole buffer), so the compiled
step grew with the rows far faster than the eager one. On this project's CPU (an Intel Xeon, 2 threads, inductor),
2 layers, rows 1/2/16/64 of 4,096 slots: compiled with the scatter (commit 995b992) 0.85/1.41/9.22/50.48 ms,
compiled with writes by index 0.72/0.85/2.40/12.08 ms, uncompiled 0.99/1.12/2.83/13.18 ms.

    python scripts/batch_rows_cost.py --rows 1 2 16 64 --capacity 4096 --compile on
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chimera.batch import RunningBatch
from chimera.models import synchronize
from report_json import save_json


class CharTokenizer:
    """Enough of a tokenizer for the batch's stop conditions: ids decode to letters."""

    eos_token_id = 2
    pad_token_id = 0

    def decode(self, ids, **kwargs) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 16, 64])
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--compile", choices=["on", "off"], default="on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.capacity,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(args.device).eval()
    batch = RunningBatch(model, CharTokenizer(), max_batch=max(args.rows), capacity=args.capacity,
                         fixed_shapes=True, compiled=args.compile == "on")
    batch.add([5] * 8, 4)  # the KV memory, allocated by a first forward
    batch.remove(batch.running[0])
    device = torch.device(args.device)
    report = {"device": args.device, "torch": torch.__version__, "compile": args.compile, "layers": args.layers,
              "capacity": args.capacity, "ms": {}}
    for rows in args.rows:
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        positions = torch.full((rows, 1), 100, device=device)
        with torch.inference_mode():
            batch._plain_forward(batch.capacity, tokens, positions)  # compiles, where compiled
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.repeats):
                batch._plain_forward(batch.capacity, tokens, positions)
            synchronize(device)
        report["ms"][rows] = round(1000 * (time.perf_counter() - start) / args.repeats, 3)
        print(json.dumps({"rows": rows, "ms": report["ms"][rows]}), flush=True)
    save_json(report, args.out)


if __name__ == "__main__":
    main()
