"""The ``chimera`` command line. Every user error ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ChimeraError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise ChimeraError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"embedded alias, .gguf file, HF directory or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")


def add_drafter_args(parser: argparse.ArgumentParser) -> None:
    from .tree import TOPOLOGIES

    parser.add_argument("--drafter", default="auto",
                        help="drafter directory, 'auto' (the shipped drafter for the model, if any), "
                             "'none' (plain decoding) or 'random' (untrained, for testing)")
    parser.add_argument("--tree", default="auto",
                        help=f"draft tree: {', '.join(TOPOLOGIES)}, a node count built from the drafter's "
                             "measured acceptance, or auto (a size suited to the device; default)")


def cmd_generate(args) -> int:
    from .drafters import resolve_drafter
    from .generate import SpeculativeDecoder
    from .models import load_base, resolve_device, resolve_dtype

    if not args.prompt.strip():
        raise ChimeraError("empty prompt")
    resolve_dtype(args.dtype)
    resolve_device(args.device)
    model, tokenizer = load_base(args.model, dtype=args.dtype, device=args.device)
    drafter = resolve_drafter(args.drafter, model)
    decoder = SpeculativeDecoder(model, tokenizer, drafter, tree=args.tree)
    stream = decoder.stream(args.prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, raw=args.raw)
    if args.json:
        for _ in stream:
            pass
        print(json.dumps(stream.result.to_dict(), ensure_ascii=False))
    else:
        for chunk in stream:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        r = stream.result
        print(f"[{r.new_tokens} tokens, {r.steps} base forwards, tau {r.tau:.2f}, {r.tokens_per_s:.1f} tokens/s]",
              file=sys.stderr)
    return 0


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def cmd_distill(args) -> int:
    from .models import load_base, resolve_device, resolve_dtype
    from .train.data import read_prompts
    from .train.distill import distill

    resolve_dtype(args.dtype)
    resolve_device(args.device)
    prompts, skipped = read_prompts(args.prompts)
    if skipped:
        print(f"chimera: skipped {skipped} malformed or duplicate lines in {args.prompts}", file=sys.stderr)
    model, tokenizer = load_base(args.model, dtype=args.dtype, device=args.device)
    summary = distill(model, tokenizer, prompts, args.out, prompts_file=args.prompts,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      temperature=args.temperature, max_prompt_tokens=args.max_prompt_tokens, limit=args.limit,
                      seed=args.seed)
    summary["skipped_malformed"] = skipped
    print(json.dumps(summary))
    return 0


def cmd_train(args) -> int:
    from dataclasses import fields

    from .models import load_base, resolve_device, resolve_dtype
    from .train.data import DistillStore
    from .train.trainer import TrainConfig, train

    resolve_dtype(args.dtype)
    resolve_device(args.device)
    store = DistillStore(args.data)
    samples = store.load()
    model, _ = load_base(args.model, dtype=args.dtype, device=args.device)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    meta = {**store.meta, "source": str(args.data)}
    result = train(model, samples, args.out, cfg, data_meta=meta, resume=not args.no_resume,
                   export_dtype=resolve_dtype(args.export_dtype))
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chimera", description="Lossless speculative decoding for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text for one prompt, streaming it")
    gen.add_argument("prompt")
    add_model_args(gen)
    add_drafter_args(gen)
    gen.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the text and statistics")
    gen.set_defaults(func=cmd_generate)

    dis = sub.add_parser("distill", help="have the base answer training prompts (self-distillation data)")
    dis.add_argument("--prompts", required=True, help="JSONL file with a 'prompt' field per line")
    dis.add_argument("--out", required=True, help="data directory (resumed if it exists)")
    add_model_args(dis)
    dis.add_argument("--max-new-tokens", type=positive_int, default=256)
    dis.add_argument("--batch-size", type=positive_int, default=32)
    dis.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    dis.add_argument("--max-prompt-tokens", type=positive_int, default=1024)
    dis.add_argument("--limit", type=positive_int, default=None, help="use only the first N prompts")
    dis.add_argument("--seed", type=int, default=0)
    dis.set_defaults(func=cmd_distill)

    from .train.trainer import TrainConfig

    defaults = TrainConfig()
    tr = sub.add_parser("train", help="train a drafter (Chimera, or Medusa heads) on distilled data")
    tr.add_argument("--data", required=True, help="a directory written by 'chimera distill'")
    tr.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, drafter/")
    add_model_args(tr)
    for name, kind in [("steps", positive_int), ("batch_size", positive_int), ("max_len", positive_int),
                       ("roots_per_seq", positive_int), ("depth", positive_int), ("lr", non_negative_float),
                       ("weight_decay", non_negative_float), ("warmup_steps", int), ("grad_clip", non_negative_float),
                       ("regression_weight", non_negative_float), ("heldout_fraction", non_negative_float),
                       ("eval_every", positive_int), ("save_every", positive_int), ("seed", int)]:
        tr.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=getattr(defaults, name),
                        help=f"(default: {getattr(defaults, name)})")
    tr.add_argument("--cache-base", action="store_true", dest="cache_base",
                    help="compute the base's outputs once per sample and keep them in memory (small data)")
    tr.add_argument("--export-dtype", default="float32", help="dtype of the exported drafter/ (default: float32)")
    tr.add_argument("--kl", action="store_true", help="match the base distribution (KL) instead of its argmax")
    tr.add_argument("--architecture", choices=["chimera", "medusa"], default="chimera",
                    help="chimera (default) or medusa (the baseline heads, for comparison in 'chimera bench')")
    tr.add_argument("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    tr.set_defaults(func=cmd_train)
    return parser


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ChimeraError as exc:
        print(f"chimera: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chimera: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
