"""What speculation should look like on this machine, measured here: the base's linear-layer route, the tree
size, the draft vocabulary, or no drafting at all.

Why: the choices that decide speed were constants measured on one processor. On an AMD EPYC (Zen 4) the
oneDNN-prepacked route and a 5-node tree made Chimera 2x faster than ``generate``; on an Intel Xeon the stock
MKL kernels were faster, and the same constants made it slower than ``generate``. So on first use of a
(machine, libraries, model, drafter) the decoder measures, in a few seconds:

1. a plain step (one token on a 200-token cache) through each linear route, stock and prepacked: the faster
   route is used for everything after;
2. on that route, a one-token forward and verifying trees of each candidate size, timed in the same rounds (on a
   shared machine a slow spell otherwise lands on whichever size was being measured: on an Intel Xeon two runs
   a few minutes apart measured a 2-node tree at 48.4 and 40.8 ms against one token's 39.4 and 38.9 ms, and chose
   plain decoding, then a 3-node tree), and drafting each of them with each candidate draft vocabulary (the
   drafter's most written tokens, FR-Spec);
3. tau: the drafter's acceptance profile (measured when it was trained) predicts tau for every tree and
   vocabulary, but on prompts it never saw the drafter accepts less (the shipped one: 3.4 predicted, 2.1
   measured on MT-bench for 5 nodes), so one short decode of a few built-in prompts with a 5-node tree
   measures the ratio and scales the predictions by it; the same decode without drafting gives the plain
   speed with every overhead included.

Expected tokens/s of a configuration = tau / (draft + verify + per-step overhead); the best one wins, and
"no drafting" wins when nothing beats the plain speed. The result is kept as JSON in the cache directory,
keyed by processor, thread count, library versions, model and drafter; a corrupt or unreadable file is
ignored with one warning and measured again. ``chimera calibrate`` re-measures. It applies on a CPU when
the tree is ``auto``; a tree, draft vocabulary or route given explicitly is kept as given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from . import cpu_linear, target
from .errors import ChimeraError
from .inputs import read_json
from .tree import TreeBuffers, TreeTopology

log = logging.getLogger("chimera")
TREE_SIZES = (2, 3, 4, 5, 6, 8)
DRAFT_VOCABS = (None, 8192, 4096)  # None: the whole vocabulary
TAU_TREE = 5  # the tree of the short decode that measures how much of the profile's promise holds
PROMPTS = ("Write a Python function that returns the n-th Fibonacci number.",
           "Explain why the sky is blue in a short paragraph.",
           "Give three tips for a job interview.")
PROMPT_TOKENS = 32
CACHE_TOKENS = 200  # the cache length the step costs are measured at


@dataclass
class Calibration:
    """What the calibration chose and measured; also the schema its JSON file is checked against (inputs.py)."""

    key: dict
    packed_linears: bool
    tree_size: int  # 0: no drafting
    draft_vocab: int | None  # None: the whole vocabulary
    plain_ms: dict[str, float] = field(default_factory=dict)  # route -> ms of a plain forward
    verify_ms: dict[str, float] = field(default_factory=dict)  # tree size -> ms
    draft_ms: dict[str, float] = field(default_factory=dict)  # "size/vocab" -> ms
    tau_scale: float = 1.0  # measured accepted tokens over the profile's prediction
    plain_tokens_per_s: float = 0.0
    expected_tokens_per_s: dict[str, float] = field(default_factory=dict)  # "size/vocab" -> tokens/s
    reason: str = ""
    # the vocabulary projection's fastest route for a plain step's row and the chosen tree's (target.HEAD_ROUTES;
    # None: the linear routes' choice, made for 1 and 6 rows), and what each route took
    head_route: str | None = None
    head_ms: dict[str, float] = field(default_factory=dict)

    @property
    def drafts(self) -> bool:
        return self.tree_size > 0

    def describe(self) -> str:
        if self.tree_size == 0:
            return f"plain decoding ({self.reason})"
        vocab = "all" if self.draft_vocab is None else self.draft_vocab
        return (f"{self.tree_size}-node tree, draft vocabulary {vocab}, "
                f"{'prepacked' if self.packed_linears else 'stock'} linear layers ({self.reason})")

    def summary(self) -> dict:
        return {"tree_size": self.tree_size, "draft_vocab": self.draft_vocab, "packed_linears": self.packed_linears,
                "reason": self.reason}


@dataclass
class Routes:
    """How a model's linear layers and its vocabulary projection run fastest on this CPU (measured); also the
    schema of its JSON file."""

    key: dict
    layers: Literal["stock", "packed"]
    head: Literal["linear", "few_rows", "packed"]  # target.HEAD_ROUTES
    ms: dict[str, float] = field(default_factory=dict)  # "layers/stock", "head/linear", ... -> ms

    def describe(self) -> str:
        return f"{self.layers} linear layers, vocabulary projection by {self.head}"


def routes_apply(model, device: torch.device) -> bool:
    return cpu_linear.available(device, model.dtype)


def linear_routes(model, device: torch.device, remeasure: bool = False) -> Routes:
    """The fastest route of the decoder's linear layers (stock or oneDNN-prepacked, one token on a 200-token
    cache) and of the vocabulary projection (1 and 6 rows), from the cache or measured (about 2 s)."""
    key = {**model_key(model), "what": "linear routes"}
    path = cache_path(key)
    saved = read_cached(path, Routes, key, remeasure)
    if saved is not None:
        return saved
    from .verifier import GrowingVerifier

    routes = Routes(key, layers="stock", head="linear")
    packed = cpu_linear.shared_packed_copy(model)
    candidates = {"stock": model, **({"packed": packed} if packed is not None else {})}
    prompt = torch.arange(CACHE_TOKENS, device=device) % model.get_input_embeddings().num_embeddings
    single = TreeBuffers.build(TreeTopology.chain(0), device)
    for name, candidate in candidates.items():
        session = GrowingVerifier(candidate, "packed").start(capacity=0)
        out = session.prefill(prompt)
        root = out.logits[-1].argmax(-1, keepdim=True)
        routes.ms[f"layers/{name}"] = round(median_ms(lambda: session.score(root, single), repeats=8), 3)
    routes.layers = min(candidates, key=lambda name: routes.ms[f"layers/{name}"])
    if routes.layers == "stock":
        cpu_linear.drop_shared_packed_copy(model)  # the copy doubles the linear weights: keep it only if used
    if target.plain_vocab_head(model):
        routes.ms.update({f"head/{name}": ms for name, ms in head_route_ms(model, device, (1, 6)).items()})
        routes.head = min(target.HEAD_ROUTES, key=lambda name: routes.ms[f"head/{name}"])
    save(routes, path)
    return routes


def head_route_ms(model, device: torch.device, rows: tuple[int, ...]) -> dict[str, float]:
    """For each route of the vocabulary projection (target.HEAD_ROUTES), ms to project ``rows[0]`` rows, then
    ``rows[1]`` rows, ... summed: a plain step's one row and a tree's nodes."""
    hidden = torch.randn(max(rows), model.get_output_embeddings().weight.shape[1], dtype=model.dtype, device=device)
    out = {}
    with torch.inference_mode():
        for name in target.HEAD_ROUTES:
            head = target.vocab_head(model, name)
            out[name] = round(sum(median_ms(lambda: head(hidden[:n])) for n in rows), 3)
    return out


def read_cached(path, schema, key: dict, remeasure: bool):
    """A cached measurement if it is there, readable and made here; else None (with a warning if it was not)."""
    if remeasure or not path.is_file():
        return None
    try:
        saved = read_json(path, schema, "calibration file")
    except ChimeraError as exc:
        log.warning("%s: measuring again", exc)
        return None
    if saved.key != key:
        log.warning("calibration file %s belongs to another machine or model: measuring again", path)
        return None
    return saved


@dataclass
class Setup:
    """A decoder's options once each 'auto' that a measurement decides here has been decided."""

    drafter: object  # None where the calibration chose plain decoding
    tree: object
    draft_vocab: object
    packed_linears: bool
    head_route: str | None = None  # target.HEAD_ROUTES; None: target.vocab_logits's default
    calibration: object = None  # Calibration (CPU) or gpu_calibration.TreeCalibration, where one decided
    routes: Routes | None = None


def resolve(model, tokenizer, drafter, device: torch.device, tree, draft_vocab, packed_linears,
            calibrate: bool = True, options: dict | None = None) -> Setup:
    """On a CPU: the tree and draft vocabulary from the calibration (``tree`` 'auto', a profiled drafter), and
    the linear routes (``packed_linears`` 'auto', float32), each measured once and cached. On a GPU: the dynamic
    tree and draft vocabulary from gpu_calibration (``tree`` 'auto'), measured by decoding with the decoder's
    switches ``options``. Elsewhere, and for options given explicitly, what was given ('auto' packed linears
    meaning the prepacked route)."""
    from . import gpu_calibration

    setup = Setup(drafter, tree, draft_vocab, packed_linears is True or packed_linears == "auto")
    if calibrate and applies(drafter, device, tree):
        setup.calibration = load_or_measure(model, tokenizer, drafter, device)
        if setup.calibration.tree_size:
            profile = drafter.acceptance_profile[: drafter.config.num_draft_heads]
            setup.tree = TreeTopology.from_profile(profile, setup.calibration.tree_size)
    elif calibrate and gpu_calibration.applies(drafter, device, tree):
        setup.calibration = gpu_calibration.load_or_measure(model, tokenizer, drafter, device,
                                                            options or gpu_calibration.decoder_options())
        setup.tree = setup.calibration.tree or tree
    if setup.calibration is not None:
        if not setup.calibration.drafts:
            setup.drafter = None
        elif draft_vocab == "auto":
            setup.draft_vocab = setup.calibration.draft_vocab or "full"
    if packed_linears == "auto" and routes_apply(model, device):
        setup.routes = linear_routes(model, device)
        setup.packed_linears, setup.head_route = setup.routes.layers == "packed", setup.routes.head
        if setup.calibration is not None and setup.calibration.head_route:  # set only where the CPU's chose a tree
            setup.head_route = setup.calibration.head_route  # measured for that tree
    return setup


def applies(drafter, device: torch.device, tree) -> bool:
    """A CPU, a tree left to ``auto`` and a drafter whose acceptance profile can predict tau for any tree."""
    return (device.type == "cpu" and tree == "auto" and drafter is not None
            and bool(getattr(drafter, "acceptance_profile", None)) and hasattr(drafter, "use_draft_vocabulary"))


def model_key(model) -> dict:
    """What a measurement on this machine depends on: processor, threads, libraries, the model."""
    import transformers

    from . import __version__
    from .identity import base_identity

    identity = base_identity(model)
    return {"processor": processor_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "chimera": __version__, "model": identity["name"],
            "model_fingerprint": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16],
            "dtype": str(model.dtype)}


def machine_key(model, drafter) -> dict:
    """``model_key`` and the drafter."""
    config = getattr(drafter, "config", None)
    drafter_facts = json.dumps({"config": asdict(config) if config is not None else None,
                                "profile": drafter.acceptance_profile,
                                "counts": getattr(drafter, "token_counts", None) is not None}, sort_keys=True)
    return {**model_key(model), "drafter": hashlib.sha256(drafter_facts.encode()).hexdigest()[:16]}


def processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path(key: dict):
    from .models import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "calibration" / f"{digest}.json"


def load_or_measure(model, tokenizer, drafter, device, progress: bool = True, remeasure: bool = False
                    ) -> Calibration:
    """The calibration for this machine, model and drafter: read from the cache, else measured and saved."""
    key = machine_key(model, drafter)
    path = cache_path(key)
    saved = read_cached(path, Calibration, key, remeasure)
    if saved is not None:
        return saved
    calibration = measure(model, tokenizer, drafter, device, key, progress, remeasure)
    save(calibration, path)
    return calibration


def save(calibration: Calibration, path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(calibration), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs a re-measurement next time, nothing else
        log.warning("could not save the calibration to %s: %s", path, exc.strerror or exc)


def median_ms(fn, repeats: int = 5, warmup: int = 1, before=None) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones; ``before()``, untimed,
    precedes each timed call (e.g. a sweep that evicts the caches)."""
    return interleaved_median_ms({None: fn}, repeats, warmup, before)[None]


def interleaved_median_ms(functions: dict, repeats: int = 7, warmup: int = 1, before=None) -> dict:
    """Median milliseconds of each of ``functions`` (name: callable), timed in rounds that call each once (``before``
    as in ``median_ms``)."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def expected_tau(profile, size: int, coverage: float, scale: float) -> float:
    """Tokens per step of the ``size``-node tree: the profile's prediction, its probabilities times the draft
    vocabulary's ``coverage`` of what the base writes (a token outside it cannot be drafted), with the drafted
    tokens it expects accepted times the measured ``scale`` (what held on unseen prompts)."""
    covered = [[p * coverage for p in row] for row in profile]
    return 1 + scale * (TreeTopology.from_profile(profile, size).expected_accepted(covered) - 1)


def coverage(drafter, size: int | None) -> float:
    counts = getattr(drafter, "token_counts", None)
    if size is None or counts is None:
        return 1.0
    counts = counts.double()
    return float(counts.topk(min(size, counts.numel())).values.sum() / counts.sum().clamp(min=1))


def measure(model, tokenizer, drafter, device, key: dict, progress: bool = True, remeasure: bool = False
            ) -> Calibration:
    from tqdm.auto import tqdm

    from .generate import SpeculativeDecoder
    from .text import encode_prompt
    from .verifier import GrowingVerifier

    profile = drafter.acceptance_profile[: drafter.config.num_draft_heads]
    vocab = model.get_output_embeddings().weight.shape[0]
    vocabs = [v for v in DRAFT_VOCABS if v is None or (v < vocab and drafter.token_counts is not None)]
    sizes = [n for n in TREE_SIZES if TreeTopology.from_profile(profile, n).max_depth <= len(profile)]
    prompt = torch.tensor([t for p in PROMPTS for t in encode_prompt(tokenizer, p)] * 8, device=device)
    prompt = prompt[:CACHE_TOKENS]
    routes = linear_routes(model, device, remeasure=remeasure)
    # on a terminal only (disable=None): a log or a captured stderr gets no carriage-return frames
    bar = tqdm(total=len(sizes) * len(vocabs) + 3, desc="calibrating", unit="step",
               disable=None if progress else True, leave=False)
    plain = {name.split("/")[1]: v for name, v in routes.ms.items() if name.startswith("layers/")}
    result = Calibration(key, packed_linears=routes.layers == "packed", tree_size=0, draft_vocab=None,
                         plain_ms=plain)
    base = cpu_linear.shared_packed_copy(model) if result.packed_linears else model
    if result.packed_linears:
        from .drafters import pack_for_cpu

        pack_for_cpu(drafter)

    session = GrowingVerifier(base, routes.head).start(capacity=0)
    out = session.prefill(prompt)
    state = drafter.start(prompt, out.hidden)
    root = out.logits[-1].argmax(-1, keepdim=True)
    trees = {n: TreeBuffers.build(TreeTopology.from_profile(profile, n) if n > 1 else TreeTopology.chain(0), device)
             for n in (1, *sizes)}
    keep_root = torch.zeros(1, dtype=torch.long, device=device)

    def verify(n):
        tokens = torch.cat([root, prompt[: n - 1]])
        return lambda: (session.score(tokens, trees[n]), session.keep(keep_root, 1, trees[n]))

    # one forward (a 1-node tree) and every tree size in the same rounds: a slow spell of a shared machine
    # weighs on all of them alike rather than on whichever was being measured
    result.verify_ms = {str(n): round(ms, 3) for n, ms in interleaved_median_ms({n: verify(n) for n in trees}).items()}
    bar.update()
    for n in sizes:
        tree = trees[n]
        for v in vocabs:
            drafter.use_draft_vocabulary(v, routes.head)  # projected as the decoder will (about)
            result.draft_ms[f"{n}/{v or 'all'}"] = round(median_ms(lambda: drafter.propose(state, root, tree)), 3)
            bar.update()
    drafter.use_draft_vocabulary(None)

    tau_tree = TreeTopology.from_profile(profile, TAU_TREE)
    runs = {}
    for name, options in (("plain", {"drafter": None}), ("tau", {"drafter": drafter, "tree": tau_tree})):
        decoder = SpeculativeDecoder(model, tokenizer, options["drafter"], tree=options.get("tree", "auto"),
                                     draft_vocab="full", adaptive=False)  # routes as measured above
        decoder.generate(PROMPTS[0], max_new_tokens=4)  # warm-up
        runs[name] = [decoder.generate(p, max_new_tokens=PROMPT_TOKENS) for p in PROMPTS]
        bar.update()
    bar.close()
    plain, spec = runs["plain"], runs["tau"]
    plain_steps = sum(r.steps - 1 for r in plain)
    result.plain_tokens_per_s = round(sum(r.new_tokens for r in plain) / sum(r.seconds - r.time_prefill
                                                                               for r in plain), 2)
    spec_steps = max(sum(r.steps - 1 for r in spec), 1)
    measured_accepted = sum(r.new_tokens - 1 for r in spec) / spec_steps - 1  # drafted tokens accepted per step
    predicted_accepted = tau_tree.expected_accepted(profile) - 1
    result.tau_scale = round(max(measured_accepted, 0.0) / max(predicted_accepted, 1e-9), 4)
    spec_other_ms = 1000 * sum(r.time_other for r in spec) / spec_steps  # acceptance, bookkeeping, drafter update
    plain_other_ms = 1000 * sum(r.time_other for r in plain) / max(plain_steps, 1)
    for n in sizes:
        for v in vocabs:
            tau = expected_tau(profile, n, coverage(drafter, v), result.tau_scale)
            step_ms = result.draft_ms[f"{n}/{v or 'all'}"] + result.verify_ms[str(n)] + spec_other_ms
            result.expected_tokens_per_s[f"{n}/{v or 'all'}"] = round(1000 * tau / step_ms, 2)
    plain_rate = 1000 / (result.verify_ms["1"] + plain_other_ms)  # measured with the trees, not with the routes
    best = max(result.expected_tokens_per_s, key=result.expected_tokens_per_s.get)
    best_rate = result.expected_tokens_per_s[best]
    if best_rate > plain_rate:
        size, vocab_name = best.split("/")
        result.tree_size = int(size)
        result.draft_vocab = None if vocab_name == "all" else int(vocab_name)
        result.reason = (f"expected {best_rate:.1f} tokens/s against {plain_rate:.1f} plain; tau measured at "
                         f"{result.tau_scale:.0%} of the drafter's profile")
        if target.plain_vocab_head(model):
            result.head_ms = head_route_ms(model, device, (1, result.tree_size))
            result.head_route = min(result.head_ms, key=result.head_ms.get)
    else:
        result.reason = (f"no tree beats plain decoding here: at best {best_rate:.1f} tokens/s against "
                         f"{plain_rate:.1f} plain")
    return result
