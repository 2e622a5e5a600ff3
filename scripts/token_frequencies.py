"""How often the base model writes each token: counts over the assistant tokens of distilled data.

The counts rank the vocabulary for a drafter's frequent-token draft vocabulary (``--draft-vocab``): drafting
over the tokens the base actually writes costs a fraction of the full vocabulary projection. ``chimera train``
saves the same counts with every Chimera drafter it exports; this script adds them to one trained before.

Usage: python scripts/token_frequencies.py --data DISTILL_DIR --out token_counts.safetensors
"""

import argparse
import json

import numpy as np
import torch
from safetensors.torch import save_file

from chimera.train.data import DistillStore, count_tokens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    store = DistillStore(args.data)
    vocab = int(store.meta["base"]["vocab_size"])
    counts = count_tokens(store.load(), vocab)
    save_file({"counts": torch.from_numpy(counts)}, args.out, metadata={"samples": str(len(store)),
                                                                         "data": str(args.data)})
    order = np.sort(counts)[::-1].cumsum() / max(1, counts.sum())
    print(json.dumps({"tokens": int(counts.sum()), "distinct": int((counts > 0).sum()),
                      "coverage": {k: round(float(order[k - 1]), 4) for k in (1024, 2048, 4096, 8192, 16384)}}))


if __name__ == "__main__":
    main()
