"""What the dynamic tree and the draft vocabulary should be on this GPU, chosen by decoding with each.

Why: on a GPU ``--tree auto`` was one tree measured once (64 nodes, beam 8, 6 levels, the whole vocabulary), but
what pays depends on the card and the model. For the default model on an H100 a drafted level costs about 0.2 ms
and verifying 64 nodes about what one token does; on a Llama-3-8B shape verifying 64 nodes costs more than a plain
step and each level projects a 128k-token vocabulary (docs/benchmarks.md). The CPU's calibration (calibration.py)
predicts tau from the drafter's acceptance profile, which describes static trees; a dynamic tree is chosen at
every step from the drafter's own probabilities, so here each candidate is measured whole: greedy decodes of six
built-in prompts (the CPU's three, a translation, a summary and a sum) with that tree and draft vocabulary, through
the decoder exactly as it will run (CUDA graphs, compiled forwards, the same switches), timed without the prefill
after an untimed pass that captures every shape. Plain decoding is measured the same way, and the highest tokens/s
wins, "no drafting" included.

The search goes one choice at a time from the default tree: its depth (levels drafted), then the draft
vocabulary at the best depth, then the node count at both: about ten decodes. Measured on an H100 in bfloat16
(default model and drafter; ``chimera calibrate --device cuda --dtype bfloat16 --json``, docs/benchmarks.md,
session 15): plain 942 tokens/s on its prompts; 64 nodes 3/4/5/6/8 levels deep 940/916/866/826/746 (tau
2.43-2.74: each level drafted cost more than the tokens it added); at 3 levels a 16,384-token draft vocabulary 975
(the whole one 940, 32,768 957, 8,192 960); then 32 and 128 nodes 936 and 916: it chose 64 nodes, 3 levels,
16,384 tokens. On Spec-Bench that choice gave 1.08x over our plain loop against 1.10x for the former fixed tree, the
same within the run-to-run spread of ``ar`` (846-890 tokens/s). It took 403 s on a fresh machine, 373 of them
compiling (the base's forward for four tree sizes 226 s, of which the 1- and 64-token ones, 116 s, any decoder
compiles; the drafter's levels and the KV compaction for five depths 146 s; the compaction now compiles once for
every depth, which on this project's CPU took its 8 path lengths from 132 s to 25 s, scripts/compaction_compiles.py);
each shape compiles once (compiled.py shares the base's forward and the drafter's levels between decoders; inductor
keeps its kernels on disk), and a later run reads the choice from the cache. It is kept in the cache directory like
the CPU's (keyed by GPU, libraries, model, drafter and the decoder's compile switches); a corrupt or stale file is
ignored with one warning and measured again; ``chimera calibrate`` re-measures. It changes what is drafted, never
what is accepted.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

import torch

from . import calibration
from .tree import AUTO_DYNAMIC, DynamicTree, default_dynamic_tree

log = logging.getLogger("chimera")
DEPTHS = (3, 4, 5, 6, 8)  # levels drafted (at most the drafter's heads)
DRAFT_VOCABS = (None, 32768, 16384, 8192)  # None: the whole vocabulary
SIZES = (32, 64, 128)  # nodes verified
PROMPTS = (*calibration.PROMPTS,
           "Translate into German: The weather was cold, so we stayed at home and read books all afternoon.",
           "Summarize in two sentences: The city council voted on Tuesday to extend the bus network to the "
           "northern suburbs, citing rising demand from commuters and a new grant from the regional government.",
           "A shop sells pens at 3 dollars each. How much do 17 pens cost? Think step by step.")
NEW_TOKENS = 96


@dataclass
class TreeCalibration:
    """What the GPU calibration chose and measured; also the schema its JSON file is checked against."""

    key: dict
    tree: str  # a dynamic tree's name (tree.get_topology); "" where plain decoding won
    draft_vocab: int | None  # None: the whole vocabulary
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # "dynamic-64-8-6/all", "plain"... -> measured
    tau: dict[str, float] = field(default_factory=dict)  # candidate -> tokens per drafted step
    seconds: float = 0.0  # the whole calibration, compilation included
    reason: str = ""
    head_route = None  # not a field: the vocabulary projection's route is chosen on a CPU only (calibration.py)

    @property
    def drafts(self) -> bool:
        return bool(self.tree)

    def describe(self) -> str:
        if not self.tree:
            return f"plain decoding ({self.reason})"
        return f"tree {self.tree}, draft vocabulary {self.draft_vocab or 'all'} ({self.reason})"

    def summary(self) -> dict:
        return {"tree": self.tree or None, "draft_vocab": self.draft_vocab, "reason": self.reason}


def decoder_options(cuda_graphs: bool = True, compile="auto", compile_drafter="auto", launch_ahead: bool = True,
                    packed_linears="auto", attention_route: str = "auto") -> dict:
    """The decoder's switches that the candidates are decoded with and the cached choice is keyed by (the defaults:
    what ``chimera calibrate`` measures)."""
    return {"cuda_graphs": cuda_graphs, "compile": compile, "compile_drafter": compile_drafter,
            "launch_ahead": launch_ahead, "packed_linears": packed_linears, "attention_route": attention_route}


def applies(drafter, device: torch.device, tree) -> bool:
    """A GPU, a tree left to ``auto`` and a drafter that drafts dynamic trees over a draft vocabulary of any size."""
    return (device.type in AUTO_DYNAMIC and tree == "auto" and getattr(drafter, "drafts_dynamic_trees", False)
            and hasattr(drafter, "use_draft_vocabulary"))


def machine_key(model, drafter, device: torch.device, options: dict) -> dict:
    """calibration.machine_key, the card and the decoder's switches the candidates were measured with."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {**calibration.machine_key(model, drafter), "what": "trees by decoding", "card": card,
            "cuda": torch.version.cuda, "options": {k: str(v) for k, v in sorted(options.items())}}


def load_or_measure(model, tokenizer, drafter, device: torch.device, options: dict, progress: bool = True,
                    remeasure: bool = False) -> TreeCalibration:
    """The choice for this card, model and drafter: read from the cache, else measured and saved. ``options``: the
    decoder's switches (cuda_graphs, compile, ...), which the candidates are decoded with."""
    key = machine_key(model, drafter, device, options)
    path = calibration.cache_path(key)
    saved = calibration.read_cached(path, TreeCalibration, key, remeasure)
    if saved is not None:
        return saved
    result = measure(model, tokenizer, drafter, key, options, progress)
    calibration.save(result, path)
    return result


def candidate_name(tree: DynamicTree, vocab: int | None) -> str:
    return f"{tree.name}/{vocab or 'all'}"


def measure(model, tokenizer, drafter, key: dict, options: dict, progress: bool = True, depths=DEPTHS,
            vocabs=DRAFT_VOCABS, sizes=SIZES, prompts=PROMPTS, new_tokens: int = NEW_TOKENS) -> TreeCalibration:
    """Decode ``prompts`` with plain decoding and with each candidate met by the search (module docstring); the
    fastest wins."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    log.info("calibrating the trees on this GPU: decoding %d prompts with each candidate (once per card, model and "
             "drafter; a first run compiles each shape it meets, minutes on a fresh machine)", len(prompts))
    default = default_dynamic_tree(drafter)
    heads = drafter.config.num_draft_heads
    vocab_size = model.get_output_embeddings().weight.shape[0]
    depths = sorted({d for d in (*depths, default.depth) if d <= heads})
    vocabs = [v for v in vocabs if v is None or (v < vocab_size and drafter.token_counts is not None)] or [None]
    sizes = sorted({*sizes, default.size})
    result = TreeCalibration(key, tree="", draft_vocab=None)
    bar = tqdm(total=len(depths) + len(vocabs) + len(sizes) - 1, desc="calibrating trees", unit="decode",
               disable=None if progress else True, leave=False)

    def rate(size: int, depth: int, vocab: int | None) -> float:
        try:
            tree = DynamicTree(size=size, depth=depth, beam=default.beam)
        except ValueError:  # more nodes than the levels' candidates: not a tree these levels can draft
            return 0.0
        name = candidate_name(tree, vocab)
        if name not in result.tokens_per_s:
            try:
                result.tokens_per_s[name], result.tau[name] = decode_rate(
                    model, tokenizer, drafter, tree.name, vocab, options, prompts, new_tokens)
            except torch.OutOfMemoryError:  # a tree too large for what is left of the card: not a candidate here
                log.warning("calibration: %s did not fit in the GPU's memory; left out", name)
                result.tokens_per_s[name], result.tau[name] = 0.0, 0.0
            bar.update()
        return result.tokens_per_s[name]

    plain = result.tokens_per_s["plain"] = decode_rate(model, tokenizer, None, None, None, options, prompts,
                                                       new_tokens)[0]
    bar.update()
    depth = max(depths, key=lambda d: rate(default.size, d, None))
    vocab = max(vocabs, key=lambda v: rate(default.size, depth, v))
    size = max(sizes, key=lambda n: rate(n, depth, vocab))
    best = rate(size, depth, vocab)
    bar.close()
    result.seconds = round(time.perf_counter() - start, 1)
    if best > plain:
        tree = DynamicTree(size, depth, default.beam)
        result.tree, result.draft_vocab = tree.name, vocab
        result.reason = (f"measured {best:.1f} tokens/s (tau {result.tau[candidate_name(tree, vocab)]:.2f}) "
                         f"against {plain:.1f} plain")
    else:
        result.reason = f"no tree beats plain decoding here: at best {best:.1f} tokens/s against {plain:.1f} plain"
    log.info("calibrated the GPU's trees in %.0f s: %s", result.seconds, result.describe())
    return result


def decode_rate(model, tokenizer, drafter, tree: str | None, vocab: int | None, options: dict, prompts,
                new_tokens: int) -> tuple[float, float]:
    """Tokens/s (prefill excluded) and tokens per drafted step of greedy decodes of ``prompts``, timed on a second
    pass (the first captures and compiles every shape they meet)."""
    from .generate import SpeculativeDecoder

    decoder = None
    try:  # the decoder made and run inside: whatever fails (out of memory), its captures are let go
        decoder = SpeculativeDecoder(model, tokenizer, drafter, tree=tree or "auto", draft_vocab=vocab or "full",
                                     adaptive=False, calibrate=False, **options)
        for prompt in prompts:
            decoder.generate(prompt, max_new_tokens=new_tokens)
        runs = [decoder.generate(prompt, max_new_tokens=new_tokens) for prompt in prompts]
    finally:
        del decoder
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # each decoder's captures hold a memory pool of their own
    seconds = sum(r.seconds - r.time_prefill for r in runs)
    tokens = sum(r.new_tokens - 1 for r in runs)  # the first comes from the prefill
    steps = max(sum(r.steps - 1 for r in runs), 1)
    return round(tokens / seconds if seconds > 0 else 0.0, 2), round(tokens / steps, 3)
