"""``chimera bench`` end to end: check every input, load once, run, summarise, report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..compiled import COMPILE_CHOICES
from ..errors import ChimeraError
from ..inputs import parse_json, read_bytes
from .methods import METHODS, PLD_TOKENS, Decoding, HFGenerate, OurDecoder
from .questions import load_questions, select
from .report import environment, summarize, write_report
from .run import CONFIG_FILE, BenchConfig, prepare_out_dir, run_bench


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def default_methods(device) -> list[str]:
    """Every method; on a CPU without hf-compiled, since transformers compiles a static-cache forward only on
    accelerators (on a CPU it would be eager generate with a preallocated cache)."""
    return [m for m in METHODS if device.type != "cpu" or m != "hf-compiled"]


def check_methods(methods) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ChimeraError(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def build_methods(names, model, tokenizer, chimera_drafter="auto", medusa_drafter="auto", tree="auto",
                  decoding: Decoding = Decoding(), draft_vocab="auto", compile="auto"):
    """The method callables, and what the report should say about their drafters and trees."""
    from ..drafters import resolve_drafter
    from ..drafters.medusa import MedusaDrafter

    methods, drafters = {}, {}
    for name in names:
        if name in ("hf", "hf-pld", "hf-compiled"):
            methods[name] = HFGenerate(model, tokenizer, PLD_TOKENS if name == "hf-pld" else None, decoding,
                                       static=name == "hf-compiled")
        elif name == "ar":
            methods[name] = OurDecoder(model, tokenizer, decoding=decoding, compile=compile)
        else:
            spec = chimera_drafter if name == "chimera" else medusa_drafter
            drafter = resolve_drafter(spec, model, architecture=name)
            if drafter is None:
                raise ChimeraError(f"method {name} needs a drafter: none is shipped for this model, so train one "
                                   f"('chimera train --architecture {name}') and pass --{name}-drafter DIR")
            kind = "medusa" if isinstance(drafter, MedusaDrafter) else "chimera"
            if kind != name:
                raise ChimeraError(f"--{name}-drafter {spec} is a {kind} drafter")
            vocab = draft_vocab if name == "chimera" else "full"
            methods[name] = OurDecoder(model, tokenizer, drafter, tree=tree, decoding=decoding, draft_vocab=vocab,
                                       compile=compile)
            topology, size = methods[name].tree, methods[name].decoder.draft_vocab
            drafters[name] = {"drafter": spec, "tree": f"{tree} ({topology.describe()})",
                              "draft_vocab": f"{vocab} ({size or 'all'} tokens)"}
            if methods[name].decoder.calibration is not None:
                drafters[name]["calibration"] = methods[name].decoder.calibration.describe()
    return methods, drafters


def bench(args, progress: bool = True) -> dict:
    from ..models import load_base, resolve_device, resolve_dtype

    questions = select(load_questions(args.questions), args.categories, args.limit)
    device = resolve_device(args.device)
    methods = check_methods(args.methods or default_methods(device))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    resolve_dtype(dtype)
    out = Path(args.out)
    model, tokenizer = load_base(args.model, dtype=dtype, device=args.device)
    decoding = Decoding(temperature=args.temperature)
    runners, drafters = build_methods(methods, model, tokenizer, args.chimera_drafter, args.medusa_drafter,
                                      args.tree, decoding, args.draft_vocab, COMPILE_CHOICES[args.compile])
    device = next(model.parameters()).device
    config = BenchConfig(questions=str(args.questions), questions_sha256=file_sha256(args.questions),
                         categories=sorted(args.categories) if args.categories else None, limit=args.limit,
                         max_new_tokens=args.max_new_tokens, methods=methods, model=args.model,
                         dtype=dtype, device=str(device), drafters=drafters, warmup=args.warmup,
                         temperature=args.temperature, seed=args.seed, compile=args.compile)
    resumed = prepare_out_dir(out, config)
    if resumed and progress:
        print(f"chimera: resuming the benchmark in {out}")
    run_bench(runners, tokenizer, questions, out, config, progress=progress)
    summary = summarize(out, methods, compare_tokens=not decoding.sampled)
    summary["environment"] = environment(model, device)
    ours = next((r.decoder.verifier.describe() for r in runners.values() if isinstance(r, OurDecoder)), None)
    if ours:
        summary["environment"]["our_loop"] = ours
    summary["settings"] = parse_json(read_bytes(out / CONFIG_FILE, "benchmark settings"), "benchmark settings")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary, summary["settings"])
    return summary
