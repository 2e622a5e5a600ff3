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
    from .tree import DEFAULT_TOPOLOGY, TOPOLOGIES

    parser.add_argument("--drafter", default="auto",
                        help="drafter directory, 'auto' (the shipped drafter for the model, if any), "
                             "'none' (plain decoding) or 'random' (untrained, for testing)")
    parser.add_argument("--tree", default=DEFAULT_TOPOLOGY, choices=list(TOPOLOGIES),
                        help=f"draft tree shape (default: {DEFAULT_TOPOLOGY})")


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
