"""Measure a drafter's acceptance profile (per head and rank, see trainer.acceptance_profile) and per-depth
top-1 on distilled data it was not trained on, and write a copy of the drafter that carries the profile.

Usage: python scripts/acceptance_profile.py --drafter DIR --data DISTILL_DIR [--out NEW_DRAFTER_DIR] [--max-len N]

``--max-len`` is the window each sample is cut to, prompt first, as in training; by default none, as ``chimera
train``'s since session 23: every sample is scored whole, the answers to long prompts too, at the positions where
Spec-Bench's summarization and retrieval questions (prompts of 680-770 tokens) draft. ``--max-len 512`` scores what
the drafters before session 24 trained on.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

import chimera
from chimera.cli import quiet_libraries
from chimera.drafters import load_any
from chimera.train.data import DistillStore
from chimera.train.trainer import TrainConfig, evaluate, with_window


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--drafter", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", help="write a copy of the drafter carrying the profile here")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--max-len", type=int, help="cut each sample to its first N tokens (default: score it whole)")
    args = p.parse_args()
    quiet_libraries()
    model, _ = chimera.load_base(args.model, dtype=args.dtype, device=args.device)
    drafter = load_any(args.drafter, model)
    samples = DistillStore(args.data).load()
    cfg = with_window(TrainConfig(depth=drafter.config.num_draft_heads, batch_size=16, max_len=args.max_len), samples)
    device = next(model.parameters()).device
    pad = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    ids = np.arange(min(args.samples, len(samples)))
    result = evaluate(model, drafter, samples, ids, cfg, pad, device)
    print(json.dumps({"top1": result["top1"], "acceptance": result["acceptance"], "max_len": cfg.max_len}))
    if not args.out:
        return
    out = Path(args.out)
    shutil.copytree(args.drafter, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config["acceptance"] = result["acceptance"]
    config["acceptance_measured_on"] = {"data": str(args.data), "samples": int(len(ids)), "max_len": cfg.max_len,
                                        "top1": result["top1"]}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
