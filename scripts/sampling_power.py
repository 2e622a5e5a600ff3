"""How large a deviation the statistical test of speculative sampling detects (its power).

Uses tests/test_sampling.py's own setup, binning, sample sizes and threshold. For each configuration and both
levels of the test (one step of sample_accept on fixed logits; whole 3-token generations), it draws R
replicate samples from deviating laws and counts how often the chi-square test rejects them:

  shift    move mass d from the most likely first token to the second one (total variation d)
  mixture  (1 - e) p + e q, q the exact one-step law of the wrong no-residual rule (step level only;
           TV = e * TV(q, p)): a rule that is wrong a fraction e of the time

It reports the smallest TV that the test rejects with probability >= 0.9, and the false-rejection rate
on the exact law itself (which should be about ALPHA). CPU only, a few seconds per configuration.

Usage: python scripts/sampling_power.py [--replicates 400] [--out docs/sampling_power.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_sampling as T  # noqa: E402

POWER = 0.9


def rejection_rate(p: dict, q: dict, n: int, replicates: int, seed: int = 0) -> float:
    """P(the test rejects) for samples of size n drawn from q, the test being built for the law p."""
    index, probs = T.bins(p, n)
    q_bins = torch.zeros_like(probs)
    for k, v in q.items():
        q_bins[index.get(k, len(probs) - 1)] += v
    gen = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(q_bins / q_bins.sum(), n * replicates, replacement=True, generator=gen)
    counts = torch.stack([torch.bincount(row, minlength=len(probs)) for row in draws.view(replicates, n)])
    stat = T.chi_square_stat(counts.double(), probs)
    return float((stat > T.chi2_critical(len(probs) - 1)).double().mean())


def shifted(p: dict, d: float) -> dict:
    """p with mass d moved from the most likely first token to the second (every continuation scaled alike)."""
    first = T.exact_marginal(p, 1)
    a, b = sorted(first, key=lambda k: -first[k])[:2]
    scale = {a: (first[a] - d) / first[a], b: (first[b] + d) / first[b]}
    return {k: v * scale.get(k[:1], 1.0) for k, v in p.items()}


def mixed(p: dict, q: dict, e: float) -> dict:
    return {k: (1 - e) * p.get(k, 0.0) + e * q.get(k, 0.0) for k in p.keys() | q.keys()}


def tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in p.keys() | q.keys())


def smallest_detected(p: dict, family, top: float, n: int, replicates: int) -> float:
    """Bisect the family's parameter for power POWER (common random numbers keep power monotone); return TV."""
    lo, hi = 0.0, top
    if rejection_rate(p, family(hi), n, replicates) < POWER:
        return float("nan")
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if rejection_rate(p, family(mid), n, replicates) >= POWER else (mid, hi)
    return tv(p, family(hi))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, drafter = T.model_and_drafter()
    tree, tokens, logits = T.tree_step(model, drafter)
    rows = []
    for name, config in T.CONFIGS.items():
        probs = T.exact_probs(logits, config)
        levels = {"step": (T.exact_step(tree, tokens, probs), T.STEP_DRAWS),
                  "loop": (T.exact_continuations(model, config), T.LOOP_SEEDS)}
        for level, (p, n) in levels.items():
            first = sorted(T.exact_marginal(p, 1).values(), reverse=True)
            row = {"config": name, "level": level, "n": n, "bins": len(T.bins(p, n)[1]),
                   "critical": round(T.chi2_critical(len(T.bins(p, n)[1]) - 1), 2),
                   "false_rejection": rejection_rate(p, p, n, args.replicates * 5),
                   "tv_shift_detected": round(smallest_detected(p, lambda d: shifted(p, d), first[0], n,
                                                                args.replicates), 4)}
            if level == "step":
                wrong = T.without_residual_law(tree, tokens, probs)
                row["tv_wrong_rule"] = round(tv(p, wrong), 4)
                row["wrong_rule_rejection"] = rejection_rate(p, wrong, n, args.replicates)
                row["tv_mixture_detected"] = round(smallest_detected(p, lambda e: mixed(p, wrong, e), 1.0, n,
                                                                     args.replicates), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"alpha": T.ALPHA, "power": POWER, "replicates": args.replicates,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
