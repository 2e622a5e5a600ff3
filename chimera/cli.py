"""The ``chimera`` command line. Every user error ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import ChimeraError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise ChimeraError(f"{self.prog}: {message}")


def number(cast, check, must: str, expected: str):
    """An argparse type: ``cast`` the text, then require ``check``; either failure is a one-line error."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value

    return parse


positive_int = number(int, lambda v: v > 0, "a positive integer", "a positive integer")
positive_float = number(float, lambda v: 0 < v < float("inf"), "a finite number > 0", "a number")
non_negative_float = number(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0", "a number")
port_number = number(int, lambda v: 0 <= v <= 65535, "between 0 and 65535", "a port number")
_token_count = number(int, lambda v: v > 0, "auto, full or a positive token count", "auto, full or a token count")


def layer_indices(text: str) -> list[int]:
    """--feature-layers: comma-separated layer numbers, by the drafter config's own rule (the base's layer count is
    checked when the drafter is built)."""
    from .drafters.chimera import FEATURE_LAYERS_RULE, feature_layers_valid

    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None
    if not feature_layers_valid(layers):
        raise argparse.ArgumentTypeError(f"must be {FEATURE_LAYERS_RULE}, got {text}")
    return layers


def draft_vocab_choice(text: str):
    return text if text in ("auto", "full") else _token_count(text)


def add_model_args(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    from .models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"embedded alias, .gguf file, HF directory or hub id (default: {DEFAULT_MODEL})")
    choices = "float32, bfloat16 or float16" + ("; auto: bfloat16 on a GPU, float32 on a CPU"
                                                if dtype == "auto" else "")
    parser.add_argument("--dtype", default=dtype, help=f"{choices} (default: {dtype})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    from .compiled import COMPILE_CHOICES

    parser.add_argument("--compile", default="auto", choices=sorted(COMPILE_CHOICES),
                        help="run the base's forward compiled by torch.compile inside our CUDA graphs: auto (on a GPU "
                             "in bfloat16 or float16; default), on, or off. Each tree size compiles once per process "
                             "(tens of seconds)")


def compile_choice(name: str):
    from .compiled import COMPILE_CHOICES

    return COMPILE_CHOICES[name]


def add_processes_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--num-processes", type=positive_int, default=1, dest="num_processes",
                        help=f"processes on this machine that {what}; started with torchrun, one per GPU on GPUs "
                             "(default: 1)")


def add_drafter_args(parser: argparse.ArgumentParser) -> None:
    from .tree import TOPOLOGIES

    parser.add_argument("--drafter", default="auto",
                        help="drafter directory, 'auto' (the shipped drafter for the model, if any), "
                             "'none' (plain decoding) or 'random' (untrained, for testing)")
    parser.add_argument("--tree", default="auto",
                        help=f"draft tree: {', '.join(TOPOLOGIES)}, a node count built from the drafter's "
                             "measured acceptance, dynamic-N[-BEAM[-DEPTH]] (chosen anew each step), or auto (the "
                             "tree measured fastest on this machine, once, cached: chimera calibrate; default)")
    parser.add_argument("--draft-vocab", default="auto", type=draft_vocab_choice,
                        help="tokens the drafter scores: auto (as many of its base's most written tokens as measured "
                             "fastest here; default), full, or a count N (the N most written)")
    add_compile_arg(parser)


def cmd_generate(args) -> int:
    from .drafters import resolve_drafter
    from .generate import SpeculativeDecoder
    from .models import load_base, resolve_device, resolve_dtype
    from .sampling import SamplingConfig

    if not args.prompt.strip():
        raise ChimeraError("empty prompt")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv come through as lone surrogates
        raise ChimeraError("the prompt is not valid UTF-8") from None
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    resolve_dtype(args.dtype)
    resolve_device(args.device)
    model, tokenizer = load_base(args.model, dtype=args.dtype, device=args.device)
    drafter = resolve_drafter(args.drafter, model)
    if args.compare:
        return compare_decodings(args, model, tokenizer, drafter)
    decoder = SpeculativeDecoder(model, tokenizer, drafter, tree=args.tree, draft_vocab=args.draft_vocab,
                                 compile=compile_choice(args.compile))
    stream = decoder.stream(args.prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, raw=args.raw,
                            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                            seed=sampling.seed)
    if args.json:
        for _ in stream:
            pass
        report = stream.result.to_dict()
        if decoder.calibration is not None:
            report["calibration"] = decoder.calibration.summary()
        print(json.dumps(report, ensure_ascii=False))
    else:
        for chunk in stream:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        r = stream.result
        print(f"[{r.new_tokens} tokens, {r.steps} base forwards, tau {r.tau:.2f}, {r.tokens_per_s:.1f} tokens/s]",
              file=sys.stderr)
    return 0


def compare_decodings(args, model, tokenizer, drafter) -> int:
    """``generate --compare``: the prompt decoded plainly, then speculatively (streamed), and both speeds."""
    from .compare import compare

    if drafter is None:
        raise ChimeraError("--compare needs a drafter: this model has no shipped one, give --drafter DIR")
    if args.temperature > 0:
        raise ChimeraError("--compare compares greedy decodings: leave --temperature at 0")

    def show(chunk: str) -> None:
        if not args.json:
            sys.stdout.write(chunk)
            sys.stdout.flush()

    result = compare(model, tokenizer, drafter, args.prompt, args.max_new_tokens, tree=args.tree,
                     draft_vocab=args.draft_vocab, stop=args.stop, raw=args.raw, on_text=show,
                     compile=compile_choice(args.compile))
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print("\n", file=sys.stdout, flush=True)
        print(result.table(), file=sys.stderr)
    if not result.identical and result.must_be_identical:
        raise ChimeraError("speculative decoding changed the output in float32: please report this as a bug")
    return 0


def cmd_calibrate(args) -> int:
    from dataclasses import asdict

    from . import calibration, gpu_calibration
    from .drafters import resolve_drafter
    from .models import load_base, resolve_device, resolve_dtype

    resolve_dtype(args.dtype)
    device = resolve_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise ChimeraError(f"calibration measures CPU or CUDA decoding, not {device.type}")
    model, tokenizer = load_base(args.model, dtype=args.dtype, device=args.device)
    drafter = resolve_drafter(args.drafter, model)
    if device.type == "cuda":
        if not gpu_calibration.applies(drafter, device, "auto"):
            raise ChimeraError("calibration on a GPU needs a Chimera drafter (it drafts dynamic trees)")
        result = gpu_calibration.load_or_measure(model, tokenizer, drafter, device,
                                                 gpu_calibration.decoder_options(), remeasure=True)
    else:
        if not calibration.applies(drafter, device, "auto"):
            raise ChimeraError("calibration needs a Chimera drafter with an acceptance profile "
                               "(chimera train saves one)")
        result = calibration.load_or_measure(model, tokenizer, drafter, device, remeasure=True)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"calibration: {result.describe()}")
        print(f"saved in {calibration.cache_path(result.key)}", file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    from .models import load_base, resolve_device, resolve_dtype
    from .train.data import read_prompts
    from .train.distill import distill

    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(args.num_processes, args.argv)
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
    if is_main_process():
        print(json.dumps(summary))
    return 0


def cmd_train(args) -> int:
    from dataclasses import fields

    from .models import load_base, resolve_device, resolve_dtype
    from .identity import base_identity
    from .train.data import DistillStore
    from .train.trainer import TrainConfig, check_data_base, train

    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(args.num_processes, args.argv)
    resolve_dtype(args.dtype)
    resolve_device(args.device)
    stores = [DistillStore(directory) for directory in args.data]
    model, _ = load_base(args.model, dtype=args.dtype, device=args.device)
    identity = base_identity(model)
    for store in stores:  # each directory by name, before any is loaded
        check_data_base(store.meta, identity, str(store.dir))
    vocab_size = model.get_input_embeddings().num_embeddings
    samples = [sample for store in stores for sample in store.load(vocab_size=vocab_size)]
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    several = len(stores) > 1
    meta = {**stores[0].meta, "source": [str(d) for d in args.data] if several else str(args.data[0])}
    # several stores answer the same prompts: each prompt's answers held out together (one store: as always)
    groups = [entry["id"] for store in stores for entry in store.index] if several else None
    result = train(model, samples, args.out, cfg, data_meta=meta, resume=not args.no_resume,
                   export_dtype=resolve_dtype(args.export_dtype), max_steps_this_run=args.stop_after, groups=groups)
    if is_main_process():
        print(json.dumps(result))
    return 0


def is_main_process() -> bool:
    """Whether this is the only process, or rank 0 of those torchrun started."""
    return os.environ.get("RANK", "0") == "0"


def launch_processes(count: int, argv: list[str]) -> int:
    """Run this very command in ``count`` data-parallel processes through torchrun (accelerate reads the ranks
    it sets); returns their exit status."""
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
               "-m", "chimera.cli", *rest]
    print(f"chimera: training in {count} processes: {' '.join(command[1:])}", file=sys.stderr)
    return subprocess.run(command).returncode


def extra_missing(exc: ImportError, command: str = "chimera serve", extra: str = "serve") -> ChimeraError:
    return ChimeraError(f"{command} needs the {extra} extra ({exc.name} is missing): "
                        f"pip install 'chimera-decoding[{extra}]'")


def server_settings(args):
    """The engine's options and the HTTP front's settings from serve's (and fleet's) arguments, checked."""
    from .models import resolve_device, resolve_dtype
    from .server import ServerConfig
    from .server.run import EngineOptions

    api_key = args.api_key if args.api_key is not None else os.environ.get("CHIMERA_API_KEY")
    if api_key is not None and not api_key.strip():
        raise ChimeraError("the API key is empty: give a non-empty --api-key or leave it out")
    if args.timeout <= 0:
        raise ChimeraError("--timeout must be positive")
    resolve_dtype(args.dtype)
    resolve_device(args.device)
    options = EngineOptions(model=args.model, dtype=args.dtype, device=args.device, drafter=args.drafter,
                            tree=args.tree, draft_vocab=args.draft_vocab, compile=args.compile,
                            max_queue=args.max_queue, timeout=args.timeout, max_batch=args.max_batch,
                            batch_context=args.batch_context, batch_drafting=args.batch_drafting)
    config = ServerConfig(model_name=args.model, api_key=api_key, default_max_tokens=args.default_max_tokens,
                          default_temperature=args.default_temperature)
    return options, config


def cmd_serve(args) -> int:
    try:
        from .server import serve_forever
        from .server.run import bind, build_engine
    except ImportError as exc:
        raise extra_missing(exc) from None

    options, config = server_settings(args)
    sock = bind(args.host, args.port)  # a busy port fails now, not after loading the model
    serve_forever(build_engine(options), config, sock)
    return 0


def fleet_settings(args):
    """``chimera fleet``'s arguments, checked: the engine's options, the front's settings, the fleet's shape."""
    from .server.fleet import FleetOptions

    options, config = server_settings(args)
    if args.port == 0:
        raise ChimeraError("--port: a fleet needs a fixed port (Ray's proxy does not report a picked one)")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise ChimeraError(f"--max-replicas ({args.max_replicas}) is below --replicas ({args.replicas})")
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if args.device.startswith("cuda") else 0.0
    fleet = FleetOptions(replicas=args.replicas, max_replicas=args.max_replicas,
                         target_ongoing_requests=args.target_ongoing_requests,
                         cpus_per_replica=args.cpus_per_replica, gpus_per_replica=gpus)
    return options, config, fleet


def cmd_fleet(args) -> int:
    try:
        from .server import fleet
    except ImportError as exc:
        raise extra_missing(exc, "chimera fleet", "cluster") from None

    options, config, shape = fleet_settings(args)
    fleet.run(options, config, shape, args.host, args.port, address=args.address)
    return 0


def cmd_bench(args) -> int:
    from .bench.command import bench

    summary = bench(args)
    print(json.dumps({scope: {m: {"tokens_per_s": round(s["tokens_per_s"], 2), "tau": round(s["tau"], 3),
                                  "speedup": s["speedup"] and round(s["speedup"], 3)}
                              for m, s in methods.items()}
                      for scope, methods in summary["categories"].items()}))
    print(f"chimera: report in {args.out}/report.md", file=sys.stderr)
    return 0


def cmd_throughput(args) -> int:
    from .bench.questions import load_questions, select
    from .bench.throughput import METHODS, table, throughput
    from .drafters import resolve_drafter
    from .models import load_base, resolve_device, resolve_dtype

    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise ChimeraError(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    questions = select(load_questions(args.questions), args.categories, args.limit)
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    resolve_dtype(dtype)
    model, tokenizer = load_base(args.model, dtype=dtype, device=args.device)
    drafter = resolve_drafter(args.drafter, model) if "chimera" in args.methods else None
    results = throughput(model, tokenizer, drafter, questions, list(dict.fromkeys(args.methods)),
                         args.concurrency, args.max_new_tokens, Path(args.out), args.max_batch,
                         progress=lambda line: print(f"chimera: {line}", file=sys.stderr),
                         batch_drafting=args.batch_drafting, tree=args.tree, draft_vocab=args.draft_vocab)
    print(table(results))
    return 0


def add_server_args(srv: argparse.ArgumentParser) -> None:
    add_model_args(srv)
    add_drafter_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=port_number, default=8000, help="(default: 8000; 0 picks a free port)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' (default: $CHIMERA_API_KEY, else no key)")
    srv.add_argument("--max-queue", type=positive_int, default=16,
                     help="requests that may wait for the decoder; more are refused with 429 (default: 16)")
    srv.add_argument("--timeout", type=non_negative_float, default=120.0,
                     help="seconds a request may take, queueing included (default: 120)")
    srv.add_argument("--max-batch", type=positive_int, default=16, dest="max_batch",
                     help="requests decoded together in one running batch when more than one is in flight (a "
                          "request alone is decoded speculatively); 1 = one at a time (default: 16)")
    srv.add_argument("--batch-context", type=positive_int, default=2048, dest="batch_context",
                     help="tokens (prompt + completion) a batch row holds; KV memory for max-batch rows of it is "
                          "allocated once; a longer request waits and is decoded alone (default: 2048)")
    srv.add_argument("--batch-drafting", action="store_true", dest="batch_drafting",
                     help="the running batch drafts too: a chain per request, verified together, where the measured "
                          "costs say it pays (off by default: slower on a 2-core CPU, not yet measured on a GPU)")
    srv.add_argument("--default-max-tokens", type=positive_int, default=256,
                     help="new tokens when a request gives no max_tokens (default: 256)")
    srv.add_argument("--default-temperature", type=non_negative_float, default=0.0,
                     help="temperature when a request gives none (default: 0, greedy; OpenAI's is 1)")


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
    gen.add_argument("--compare", action="store_true",
                     help="decode plainly too (after a short warm-up of each) and show both speeds and that the "
                          "texts are identical")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 = greedy (default); > 0 samples, losslessly, from the base's distribution")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: 0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1 = off)")
    gen.add_argument("--seed", type=int, default=None, help="makes a sampled run reproducible (default: random)")
    gen.set_defaults(func=cmd_generate)

    cal = sub.add_parser("calibrate", help="measure what speculation should look like on this machine: on a CPU "
                                           "the linear route, tree size and draft vocabulary, on a GPU the dynamic "
                                           "tree and draft vocabulary, or no drafting; cached")
    add_model_args(cal)
    cal.add_argument("--drafter", default="auto", help="drafter directory or 'auto' (the shipped one; default)")
    cal.add_argument("--json", action="store_true", help="print every measurement as JSON")
    cal.set_defaults(func=cmd_calibrate)

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
    add_processes_arg(dis, "answer the prompts")
    dis.set_defaults(func=cmd_distill)

    from .train.trainer import TrainConfig

    defaults = TrainConfig()
    default_help = {"max_len": "tokens a sample is cut to, prompt first (default: the longest sample, so that the "
                               "answers to long prompts are trained too)"}
    tr = sub.add_parser("train", help="train a drafter (Chimera, or Medusa heads) on distilled data")
    tr.add_argument("--data", required=True, nargs="+",
                    help="one or more directories written by 'chimera distill' (e.g. greedy and sampled answers to "
                         "the same prompts), trained on together")
    tr.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, drafter/")
    add_model_args(tr)
    for name, kind in [("steps", positive_int), ("batch_size", positive_int), ("max_len", positive_int),
                       ("roots_per_seq", positive_int), ("depth", positive_int), ("lr", non_negative_float),
                       ("weight_decay", non_negative_float), ("warmup_steps", int), ("grad_clip", non_negative_float),
                       ("regression_weight", non_negative_float), ("heldout_fraction", non_negative_float),
                       ("eval_every", positive_int), ("save_every", positive_int), ("seed", int)]:
        tr.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=getattr(defaults, name),
                        help=default_help.get(name, f"(default: {getattr(defaults, name)})"))
    tr.add_argument("--cache-base", action="store_true", dest="cache_base",
                    help="compute the base's outputs once per sample and keep them in memory (small data)")
    tr.add_argument("--export-dtype", default="float32", help="dtype of the exported drafter/ (default: float32)")
    tr.add_argument("--kl", action="store_true", help="match the base distribution (KL) instead of its argmax")
    tr.add_argument("--feature-layers", dest="feature_layers", type=layer_indices, default=[],
                    help="comma-separated base layers (e.g. 2,15,27) whose hidden states the drafter reads beside the "
                         "final ones, fused at its input (default: the final ones alone)")
    tr.add_argument("--init", help="a saved drafter to start from (same kind and base, at most --depth heads; "
                                   "extra heads start as copies of its last one)")
    tr.add_argument("--architecture", choices=["chimera", "medusa"], default="chimera",
                    help="chimera (default) or medusa (the baseline heads, for comparison in 'chimera bench')")
    tr.add_argument("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    tr.add_argument("--stop-after", type=positive_int, default=None, dest="stop_after",
                    help="train at most N steps in this run, save, and exit (run again to resume)")
    add_processes_arg(tr, "train (data-parallel; the global batch, schedule and results do not depend on N)")
    tr.set_defaults(func=cmd_train)

    from .bench.methods import METHODS

    be = sub.add_parser("bench", help="Spec-Bench protocol: every method on the same questions, one report")
    be.add_argument("--questions", required=True, help="Spec-Bench style JSONL (question_id, category, turns)")
    be.add_argument("--categories", nargs="+", help="Spec-Bench categories (mt_bench, translation, ...) or finer "
                                                    "ones (writing, coding, ...); default: all")
    be.add_argument("--limit", type=positive_int, help="at most N questions per category")
    be.add_argument("--max-new-tokens", type=positive_int, default=256)
    be.add_argument("--methods", nargs="+", help=f"from {', '.join(METHODS)} (default: all; on a CPU all but "
                                                 "hf-compiled, which transformers compiles on accelerators only)")
    add_model_args(be, dtype="auto")
    add_compile_arg(be)
    be.add_argument("--chimera-drafter", default="auto", help="drafter directory for 'chimera' (default: shipped)")
    be.add_argument("--medusa-drafter", default="auto", help="drafter directory for 'medusa' (default: shipped)")
    be.add_argument("--tree", default="auto", help="draft tree for chimera and medusa (as in 'generate')")
    be.add_argument("--draft-vocab", default="auto", type=draft_vocab_choice,
                    help="chimera's draft vocabulary (as in 'generate')")
    be.add_argument("--warmup", type=int, default=2, help="untimed rounds of every method first (default: 2)")
    be.add_argument("--temperature", type=non_negative_float, default=0.0,
                    help="0 (default): greedy; above 0: every method samples at this temperature (no top-k/top-p)")
    be.add_argument("--seed", type=int, default=0, help="run seed for sampling; each turn gets its own (default: 0)")
    be.add_argument("--out", required=True, help="results directory (resumed when it holds this configuration)")
    be.set_defaults(func=cmd_bench)

    th = sub.add_parser("throughput", help="many users at once: requests replayed at fixed concurrency through "
                                           "the server's engine (batched), with total and per-request speed")
    th.add_argument("--questions", required=True, help="Spec-Bench style JSONL; the first turn of each is a request")
    th.add_argument("--categories", nargs="+", help="Spec-Bench categories or finer ones (default: all)")
    th.add_argument("--limit", type=positive_int, help="at most N questions per category")
    th.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 4, 16, 64],
                    help="clients sending at once (default: 1 4 16 64)")
    th.add_argument("--methods", nargs="+", default=["hf", "ar", "chimera"],
                    help="from hf (generate on batches, a reference), hf-compiled (the same with a static cache, "
                         "compiled on a GPU), ar, chimera (default: hf ar chimera)")
    th.add_argument("--max-new-tokens", type=positive_int, default=128)
    th.add_argument("--max-batch", type=positive_int, default=None, dest="max_batch",
                    help="the engine's running batch (default: the concurrency)")
    th.add_argument("--drafter", default="auto", help="drafter for chimera (default: the shipped one)")
    th.add_argument("--tree", default="auto", help="draft tree for chimera alone (as in 'generate')")
    th.add_argument("--draft-vocab", default="auto", type=draft_vocab_choice,
                    help="chimera's draft vocabulary (as in 'generate')")
    th.add_argument("--batch-drafting", action="store_true", dest="batch_drafting",
                    help="chimera's running batch drafts too (chimera serve --batch-drafting)")
    th.add_argument("--out", required=True, help="results directory: throughput.json and throughput.md")
    add_model_args(th, dtype="auto")
    th.set_defaults(func=cmd_throughput)

    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_server_args(srv)
    srv.set_defaults(func=cmd_serve)

    fl = sub.add_parser("fleet", help="serve replicas of the model on a Ray cluster behind one OpenAI-compatible "
                                      "endpoint (needs the cluster extra)")
    add_server_args(fl)
    fl.add_argument("--replicas", type=positive_int, default=2, help="engine replicas (default: 2)")
    fl.add_argument("--max-replicas", type=positive_int, default=None, dest="max_replicas",
                    help="above --replicas: Ray adds replicas up to this many as requests queue, and removes them "
                         "when idle (default: a fixed --replicas)")
    fl.add_argument("--target-ongoing-requests", type=positive_float, default=None, dest="target_ongoing_requests",
                    help="requests per replica that autoscaling aims at (default: half of --max-batch)")
    fl.add_argument("--cpus-per-replica", type=positive_float, default=1.0, dest="cpus_per_replica",
                    help="CPU cores Ray reserves for each replica; a CPU replica runs as many torch threads "
                         "(default: 1)")
    fl.add_argument("--gpus-per-replica", type=non_negative_float, default=None, dest="gpus_per_replica",
                    help="GPUs for each replica (default: 1 when --device is cuda, else 0)")
    fl.add_argument("--address", default=None,
                    help="a running Ray cluster to deploy on ('auto', or host:port of its head; default: start "
                         "one on this machine)")
    fl.set_defaults(func=cmd_fleet)
    return parser


def quiet_libraries() -> None:
    """Libraries' chatter off; our own progress lines (logger "chimera", INFO and up) on stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ours = logging.getLogger("chimera")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("chimera: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return args.func(args)
    except ChimeraError as exc:
        print(f"chimera: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chimera: interrupted", file=sys.stderr)
        return 130
    finally:  # processes torchrun started leave their process group closed: left to the interpreter's exit, gloo's
        distributed = sys.modules.get("torch.distributed")  # threads aborted a rank now and then ("terminate called")
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
