"""Measure a drafter's acceptance profile (per head and rank, see trainer.acceptance_profile), per-depth top-1 and
acceptance odds (per head, how its probabilities map to its candidates' chance of acceptance, see
trainer.acceptance_odds) on distilled data it was not trained on, and write a copy of the drafter that carries them.

Usage: python scripts/acceptance_profile.py --drafter DIR --data DISTILL_DIR [--out NEW_DRAFTER_DIR] [--max-len N]
           [--fields acceptance acceptance_odds] [--confidence FILE.json]

``--confidence`` writes the reliability table per depth (each probability bin's candidates, their mean probability
and how often they were the base's token), which the odds are fitted to; a line per depth goes to standard error.
``--fields`` names what the copy takes from this measurement (by default both the profile and the odds).

``--max-len`` is the window each sample is cut to, prompt first, as in training; by default none, as ``chimera
train``'s since session 23: every sample is scored whole, the answers to long prompts too, at the positions where
Spec-Bench's summarization and retrieval questions (prompts of 680-770 tokens) draft. ``--max-len 512`` scores what
the drafters before session 24 trained on.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

import chimera
from chimera.cli import quiet_libraries
from chimera.drafters import load_any
from chimera.train.data import DistillStore
from chimera.train.trainer import TrainConfig, evaluate, with_window
from report_json import save_json


def reliability(confidence: list, odds: list | None) -> dict:
    """Per depth: its candidates' mean probability against how often they were the base's token, overall and in each
    probability bin (trainer.evaluate's ``confidence``), with the fitted odds line; a line per depth to stderr."""
    depths = []
    for k, (seen, right, mass) in enumerate(np.asarray(confidence)):
        bins = [{"from": round(i / len(seen), 3), "candidates": int(n),
                 "mean_probability": round(float(m / n), 4) if n else None,
                 "acceptance": round(float(r / n), 4) if n else None}
                for i, (n, r, m) in enumerate(zip(seen, right, mass))]
        line = odds[k] if odds and k < len(odds) else None
        depths.append({"depth": k + 1, "candidates": int(seen.sum()),
                       "mean_probability": round(float(mass.sum() / max(seen.sum(), 1)), 4),
                       "acceptance": round(float(right.sum() / max(seen.sum(), 1)), 4), "odds_line": line,
                       "bins": bins})
        print(f"depth {k + 1}: " + " ".join(f"{b['mean_probability']:.2f}->{b['acceptance']:.2f}" for b in bins
                                             if b["candidates"] >= 100) + f"; odds line {line}", file=sys.stderr)
    return {"depths": depths}


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
    p.add_argument("--fields", nargs="+", choices=["acceptance", "acceptance_odds"],
                   default=["acceptance", "acceptance_odds"], help="what the copy written to --out takes")
    p.add_argument("--confidence", help="write the reliability table per depth here (JSON)")
    args = p.parse_args()
    quiet_libraries()
    model, _ = chimera.load_base(args.model, dtype=args.dtype, device=args.device)
    drafter = load_any(args.drafter, model)
    samples = DistillStore(args.data).load()
    cfg = with_window(TrainConfig(depth=drafter.config.num_draft_heads, batch_size=16, max_len=args.max_len), samples)
    device = next(model.parameters()).device
    pad = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    ids = np.arange(min(args.samples, len(samples)))
    result = evaluate(model, drafter, samples, ids, cfg, pad, device, confidence_table=True)
    print(json.dumps({"top1": result["top1"], "acceptance": result["acceptance"],
                      "acceptance_odds": result["acceptance_odds"], "max_len": cfg.max_len}))
    if args.confidence:
        save_json(reliability(result["confidence"], result["acceptance_odds"]), args.confidence)
    if not args.out:
        return
    out = Path(args.out)
    shutil.copytree(args.drafter, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    for field in args.fields:  # each with where it was measured
        config[field] = result[field]
        config[f"{field}_measured_on"] = {"data": str(args.data), "samples": int(len(ids)), "max_len": cfg.max_len,
                                          "top1": result["top1"]}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
