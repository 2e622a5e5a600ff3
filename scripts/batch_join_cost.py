"""What a sequence's join costs a running batch (chimera/batch.py), with and without the drafter: the prefill of its
prompt into a free row, and, with the drafter, the prompt read into the drafter's state at the join
(``RunningBatch._read_prompt``), timed alone too. Interleaved medians, default model, float32.

Why: in `chimera throughput` on this project's CPU (session 29) `chimera`'s joins took 2.7 s more than `ar`'s at 16
clients (27.6 against 24.9 s over 66 joins) and 0.6 s more at 64, a loss as large as its steps' at 16; and a join
with the drafter does one thing more, that read. This measures whether the read is what costs.

    python scripts/batch_join_cost.py --lengths 128 700
"""

import argparse
import sys

import torch

import chimera
from chimera.batch import RunningBatch
from chimera.calibration import interleaved_median_ms
from chimera.cli import quiet_libraries
from chimera.drafters import resolve_drafter
from chimera.models import resolve_device, synchronize
from report_json import print_and_save

TEXT = ("The city council voted on Tuesday to extend the bus network to the northern suburbs, citing rising demand "
        "from commuters and a new grant from the regional government. ")


def prompt_of(tokenizer, length: int) -> list[int]:
    ids = tokenizer(TEXT * (1 + length // 20))["input_ids"]
    if len(ids) < length:
        raise SystemExit(f"--lengths: {length} tokens is more than this script's text gives ({len(ids)})")
    return ids[:length]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 700], help="prompt lengths in tokens")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if min(args.lengths) < 1 or args.repeats < 1:
        sys.exit("--lengths and --repeats must be positive")
    quiet_libraries()
    device = resolve_device(args.device)
    model, tokenizer = chimera.load_base("smollm2-135m-instruct", dtype="float32", device=str(device))
    drafter = resolve_drafter("auto", model)
    capacity = max(args.lengths) + 8
    batches = {"ar": RunningBatch(model, tokenizer, 2, capacity),
               "chimera": RunningBatch(model, tokenizer, 2, capacity, drafter=drafter)}
    report = {"device": str(device), "threads": torch.get_num_threads(), "lengths": {}}
    for length in args.lengths:
        ids = prompt_of(tokenizer, length)

        def join(batch):
            def run():
                sequence, _ = batch.add(ids, 8)
                synchronize(device)
                batch.remove(sequence)
            return run

        def read():
            batch = batches["chimera"]
            batch._read_prompt(torch.tensor([ids], device=device), torch.tensor([0], device=device))
            synchronize(device)

        times = interleaved_median_ms({"join ar": join(batches["ar"]), "join chimera": join(batches["chimera"]),
                                       "drafter read": read}, repeats=args.repeats)
        report["lengths"][length] = {name: round(ms, 2) for name, ms in times.items()}
        report["lengths"][length]["read share of chimera join"] = round(times["drafter read"]
                                                                        / times["join chimera"], 4)
    print_and_save(report, args.out)


if __name__ == "__main__":
    main()
