"""A bench run's overall speed leaving out the questions where any method had a turn far below its usual speed
(a compilation or a graph capture inside a timed turn), the same questions for every method.

Usage: python scripts/bench_steady_state.py docs/bench/gpu-h200-session8-compiled-bf16 [--below 20]
"""

import argparse
import json
import statistics
from pathlib import Path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--below", type=float, default=20.0, help="tokens/s under which a turn counts as disturbed")
    args = p.parse_args()
    methods = json.loads((args.run / "bench_config.json").read_text())["methods"]
    per_question = {}
    for method in methods:
        per_question[method] = {}
        for line in (args.run / f"{method}.jsonl").read_text().splitlines():
            row = json.loads(line)
            choice = row["choices"][0]
            slowest = min(t / s for t, s in zip(choice["new_tokens"], choice["wall_time"]))
            per_question[method][row["question_id"]] = (sum(choice["new_tokens"]), sum(choice["wall_time"]), slowest)
    disturbed = sorted({q for rows in per_question.values() for q, (_, _, slowest) in rows.items()
                        if slowest < args.below})
    kept = [q for q in per_question[methods[0]] if q not in disturbed]
    print(f"left out {len(disturbed)} questions with a turn below {args.below} tokens/s: {disturbed}")
    first = None
    for method in methods:
        speed = statistics.mean(per_question[method][q][0] / per_question[method][q][1] for q in kept)
        first = first or speed
        print(f"{method}: {speed:.1f} tokens/s over {len(kept)} questions, {speed / first:.2f}x {methods[0]}")


if __name__ == "__main__":
    main()
