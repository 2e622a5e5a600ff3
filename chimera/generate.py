"""The decoding loop: draft a tree, verify it in one base forward, accept, compact, repeat.

With no drafter the tree is just its root and the loop is plain autoregressive decoding through the same
code, which makes it the fair baseline for speed ("our own autoregressive loop"). On a GPU a greedy step is
queued before the host has read the one before it where it needs nothing that read gives (steps.py,
device_read.py), so the device does not wait for the host between steps: measured on an H200 with the default
model, a plain step cost 1.66 ms read step by step and 1.50 ms queued back to back with no reads. Temperature 0
accepts by greedy matching; a positive temperature by rejection sampling (acceptance.sample_accept), driven by one
seeded ``torch.Generator`` per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import attention, calibration, gpu_calibration
from .adaptive import DraftingSwitch, PauseMemory, StepCosts
from .errors import ChimeraError
from .drafters import apply_draft_vocabulary, feature_layers_of, pack_for_cpu
from .device_read import StepRead
from .drafters.graphs import GraphedDrafter
from .models import context_limit
from .sampling import SamplingConfig, target_probs
from .steps import StepLauncher
from .text import StopCondition, encode_prompt, eos_token_ids, stop_condition
from .tree import DynamicTree, TreeBuffers, TreeTopology, get_topology, require_dynamic_drafter
from .verifier import new_verifier


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    steps: int  # base forwards, the prefill included
    seconds: float
    accepted: list[int] = field(default_factory=list)  # tokens emitted by each base forward
    plain_steps: int = 0  # steps the loop chose not to draft (adaptive.py), of those after the prefill
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "steps": self.steps,
            "tau": round(self.tau, 4),
            "plain_steps": self.plain_steps,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "time_split": {
                "prefill": round(self.time_prefill, 4),
                "draft": round(self.time_draft, 4),
                "verify": round(self.time_verify, 4),
                "other": round(self.time_other, 4),
            },
        }


@dataclass
class Progress:
    """Where a decoding stands between two pieces of text: enough to continue it elsewhere (the server moves a
    request decoded alone into its running batch when others arrive, batch.RunningBatch.adopt). The emitted
    tokens are ``stopper.tokens``; the KV of all but the newest is computed, the newest is the next input."""

    prompt_ids: list[int]
    stopper: StopCondition
    sampling: SamplingConfig
    generator: torch.Generator | None
    result: GenerationResult  # steps and accepted tokens so far
    started: float  # time.perf_counter() when decoding began
    verified_kv: Callable[[], list] | None = None  # the KV of all but the newest token, where the session has it
    verified_hidden: torch.Tensor | None = None  # their final hidden states (length, hidden), where kept


class GenerationStream:
    """Iterate to receive text as it is produced; ``result`` is set once the iteration ends. Between two pieces,
    ``progress`` says where decoding stands (stop iterating, and it can continue elsewhere)."""

    def __init__(self, chunks: Iterator[str], progress: list):
        self._chunks = chunks
        self._progress = progress  # filled by the decoding loop when it starts
        self.result: GenerationResult | None = None

    @property
    def progress(self) -> Progress:
        return self._progress[0]

    def __iter__(self):
        self.result = yield from self._chunks


def warm_up_lengths(top: int) -> list[int]:
    """Prompt lengths up to ``top`` at either end of every power-of-two bucket: between them, every length's
    prefill bucket and slot capacity (both powers of two of a length plus constants) is met."""
    lengths = set()
    for bucket in (1 << k for k in range(top.bit_length() + 1)):
        lengths.update(n for n in (bucket // 2 + 1, bucket, top) if n <= top)
    return sorted(lengths)


class SpeculativeDecoder:
    """Lossless decoding of one base model, accelerated by an optional drafter.

    >>> model, tokenizer = chimera.load_base("smollm2-135m-instruct")
    >>> decoder = SpeculativeDecoder(model, tokenizer, drafter)
    >>> decoder.generate("Hi!", max_new_tokens=64).text
    >>> decoder.generate("Hi!", temperature=0.7, top_p=0.9, seed=0).text  # sampled, reproducible

    ``draft_vocab``: 'auto' (the drafter's most written tokens where the vocabulary projection is costly, i.e. on
    a CPU), 'full', or a token count. It changes what is drafted, never what is output.

    ``packed_linears``: on a CPU in float32, run the base's and the drafter's linear layers through oneDNN with
    prepacked weights (cpu_linear): a second copy of the base's linear weights, made only if memory allows,
    that makes a forward over a few tree tokens cost about what one token does. ``model`` itself is not changed.

    ``calibrate``: with ``tree="auto"``, choose the tree and the draft vocabulary (where 'auto') by measuring them
    on this machine once (cached on disk), down to no drafting where nothing beats plain decoding: on a CPU from
    the measured costs of its parts and the drafter's profile (calibration.py), on a GPU by decoding with each
    candidate dynamic tree (gpu_calibration.py). ``packed_linears`` 'auto' (CPU, float32): the linear layers'
    route and the vocabulary projection's, measured likewise (calibration.linear_routes); True or False forces
    the layers' route.

    ``compile``: with CUDA graphs on a GPU, capture the base's decoder compiled by torch.compile (fused norms,
    rotary, activations; compiled.py) rather than transformers' op-by-op forward. Each tree size then compiles
    once per process, tens of seconds, on its first use. 'auto' (default): in bfloat16 and float16 only; in float32
    inductor's kernels round a 64-token tree forward differently from a one-token one often enough to change an
    output (measured: 2 of 7 Spec-Bench turns on an H200), which the uncompiled forward never did there.

    ``compile_drafter``: with CUDA graphs, run drafting through torch.compile inside its capture
    (``ChimeraDrafter.compiled_levels``: each level's layer, attention and head, and the dynamic tree's choice of
    candidates; the vocabulary projection, its log-softmax and top-k stay op by op). 'auto' (default): where the
    base's forward is compiled. Measured in bfloat16 with the default model's 64-node trees of 8 levels: drafting
    3.2 → 2.1 ms a step on an H200 with the layer and head compiled (session 12), 754 → 444 kernels and 2.1 → 1.8 ms
    on an H100 with the rest (session 13; docs/benchmarks.md; compiling the whole drafting function had made it 10x
    slower, session 9).

    ``adaptive``: stop drafting for a while where the drafter's accepted tokens do not pay for its measured cost
    (adaptive.py); greedy and unseeded sampled runs only, and never a change to the output.

    ``launch_ahead``: launch a greedy step on a slot cache before the host has read the one before it, where that
    one's bookkeeping was done on the device (steps.py). False reads every step before the next is launched: the
    same output, for measuring what launching ahead saves.

    ``attention_route``: on a GPU, the verifier's attention (verifier.SlotVerifier, attention.VERIFIER_ATTENTION):
    "repeated", transformers' SDPA, which copies each layer's keys and values per query head under a mask; "grouped",
    one-token steps without the copies; "folded", one-token steps grouped and a tree's query heads folded onto their
    key head. "auto" (default): "folded" where the base's forward is compiled (bfloat16, float16), "repeated"
    otherwise (attention.verifier_route: what an H200 measured). Built on a CPU as a GPU builds them, each decodes
    generate's tokens in float32 (tests); on a GPU's kernels scripts/gpu_graph_check.py --attention-route checks it.

    Sampling is lossless too: each token is distributed exactly as ``model.generate(do_sample=True,
    temperature=, top_k=, top_p=)`` would draw it (top_k 0 = off here, not generate's default 50).
    """

    def __init__(self, model, tokenizer, drafter=None, tree: str | TreeTopology = "auto",
                 sync_timing: bool = False, cuda_graphs: bool = True, draft_vocab: str | int | None = "auto",
                 packed_linears: bool | str = "auto", adaptive: bool = True, calibrate: bool = True,
                 compile: bool | str = "auto", compile_drafter: bool | str = "auto", launch_ahead: bool = True,
                 attention_route: str = "auto"):
        if attention_route not in ("auto", *attention.VERIFIER_ATTENTION):
            raise ChimeraError(f"attention_route must be one of auto, {', '.join(attention.VERIFIER_ATTENTION)}, got "
                               f"{attention_route!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        setup = calibration.resolve(model, tokenizer, drafter, self.device, tree, draft_vocab, packed_linears,
                                    calibrate, gpu_calibration.decoder_options(cuda_graphs, compile, compile_drafter,
                                                                               launch_ahead, packed_linears,
                                                                               attention_route))
        self.calibration, self.routes = setup.calibration, setup.routes
        drafter, tree, draft_vocab, packed_linears = setup.drafter, setup.tree, setup.draft_vocab, setup.packed_linears
        self.drafter = drafter
        if packed_linears and drafter is not None:
            pack_for_cpu(drafter)  # where oneDNN serves the drafter's device and dtype; a no-op elsewhere
        self.draft_vocab = apply_draft_vocabulary(drafter, draft_vocab, self.device, setup.head_route)
        if drafter is not None and hasattr(drafter, "prepare_inference"):
            drafter.prepare_inference()  # one-time precomputation, kept out of every request's time
        self.limit = context_limit(model)
        topology = get_topology(tree, drafter, self.device) if isinstance(tree, str) else tree
        if isinstance(topology, DynamicTree):
            require_dynamic_drafter(drafter)
        heads = getattr(getattr(drafter, "config", None), "num_draft_heads", None)
        if drafter is not None and heads is not None and topology.max_depth > heads:
            raise ChimeraError(f"the tree is {topology.max_depth} deep but the drafter has {heads} heads: "
                               "choose a shallower --tree")
        self.tree = TreeBuffers.build(topology if drafter is not None else TreeTopology.chain(0), self.device)
        if compile == "auto":  # float32 keeps the uncompiled forward: its token-for-token identity with generate
            compile = model.dtype in (torch.bfloat16, torch.float16)
        self.attention_route = attention.verifier_route(attention_route, compile)
        if compile_drafter == "auto":
            compile_drafter = compile
        if (cuda_graphs and drafter is not None and self.tree.topology.size > 1
                and GraphedDrafter.supported(drafter, self.device, self.limit)):
            self.drafter = GraphedDrafter(drafter, self.tree, capacity=self.limit, compiled=compile_drafter)
        self.root_only = TreeBuffers.build(TreeTopology.chain(0), self.device)
        self.verifier = new_verifier(model, self.device, cuda_graphs, packed_linears, setup.head_route,
                                     compiled=compile, features=feature_layers_of(drafter),
                                     attention_route=self.attention_route)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.sync_timing = sync_timing and self.device.type == "cuda"
        self.adaptive = adaptive
        self.launch_ahead = launch_ahead
        self.costs = StepCosts()  # measured as it decodes, kept across generations
        self.pauses = PauseMemory()  # adaptive drafting's last judged trial, likewise

    def clock(self) -> float:
        """``time.perf_counter()``, after waiting for the device where ``sync_timing`` asks for a split of each
        step's time that counts the device's work where it happens."""
        if self.sync_timing:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def prepare(self, prompt=None, input_ids=None, raw: bool = False) -> list[int]:
        if input_ids is not None:
            ids = input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
            if not ids:
                raise ChimeraError("empty prompt")
        elif prompt is None:
            raise ChimeraError("give a prompt, chat messages or input_ids")
        else:
            ids = encode_prompt(self.tokenizer, prompt, raw=raw)
        if len(ids) >= self.limit:
            raise ChimeraError(f"the prompt is {len(ids)} tokens but the model's context is {self.limit} tokens")
        return ids

    def stream(self, prompt=None, *, input_ids=None, max_new_tokens: int = 256, stop=(), raw: bool = False,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
               ) -> GenerationStream:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = self.prepare(prompt, input_ids, raw)
        progress = []
        return GenerationStream(self._decode(ids, max_new_tokens, stop, sampling, progress), progress)

    def generate(self, prompt=None, *, input_ids=None, max_new_tokens: int = 256, stop=(), raw: bool = False,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
                 ) -> GenerationResult:
        stream = self.stream(prompt, input_ids=input_ids, max_new_tokens=max_new_tokens, stop=stop, raw=raw,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        for _ in stream:
            pass
        return stream.result

    def warm_up(self, prompt_tokens: int, max_new_tokens: int, steps: int = 3) -> float:
        """Capture (and compile) ahead of time what requests with prompts of up to ``prompt_tokens`` tokens and
        ``max_new_tokens`` new ones will replay: each slot capacity and each prefill length bucket they reach (a
        few decoding steps on a prompt at either end of every power-of-two bucket). Nothing to do without CUDA
        graphs. Returns the seconds it took; a first capture inside a request would cost it 0.1-0.6 s (measured
        on an H200 for the default model), which a benchmark would count."""
        if not getattr(getattr(self.verifier, "runner", None), "graphs", False):
            return 0.0
        start = time.perf_counter()
        filler = next(t for t in range(1, 1 << 20) if t not in self.eos_ids)  # any token but an end of sequence
        for n in warm_up_lengths(min(prompt_tokens, self.limit - 1)):
            stream = self.stream(input_ids=[filler] * n, max_new_tokens=min(max_new_tokens, self.limit - n))
            for _ in zip(range(steps), stream):
                pass
        return time.perf_counter() - start

    def resume(self, progress: Progress) -> GenerationStream:
        """Continue here a decoding begun elsewhere (the server's batch, batch.Sequence.progress): its prompt and
        every emitted token but the newest are prefilled, the newest is the next input, and its stop condition,
        generator and counts come along, so its text goes on where it stopped."""
        stopper = progress.stopper
        if stopper.done or not stopper.tokens:
            raise ChimeraError("only a decoding that has emitted a token and not stopped can continue")
        if len(progress.prompt_ids) + stopper.max_new_tokens > self.limit:
            raise ChimeraError(f"the request needs {len(progress.prompt_ids) + stopper.max_new_tokens} tokens but "
                               f"the model's context is {self.limit}")
        out = []
        return GenerationStream(self._decode(progress.prompt_ids, stopper.max_new_tokens, (), progress.sampling, out,
                                             resume=progress), out)

    def _drafts(self, wanted: bool, length: int) -> bool:
        """Whether a step on a sequence of ``length`` tokens drafts: the switch ``wanted`` it, and its tree fits."""
        return (wanted and self.drafter is not None and self.tree.topology.size > 1
                and length + self.tree.topology.max_depth < self.limit)

    def _decode(self, prompt_ids: list[int], max_new_tokens: int, stop, sampling: SamplingConfig,
                progress: list | None = None, resume: Progress | None = None) -> Iterator[str]:
        if resume is None:
            stopper = stop_condition(self.tokenizer, self.eos_ids, max_new_tokens, self.limit - len(prompt_ids), stop)
            generator = None if sampling.greedy else sampling.generator(self.device)
            known = prompt_ids
        else:
            stopper, generator = resume.stopper, resume.generator
            known = [*prompt_ids, *stopper.tokens[:-1]]
        budget = stopper.max_new_tokens
        t0 = self.clock()
        prompt = torch.tensor(known, device=self.device)
        # room for the prompt, the new tokens and a tree past them; and for one path more: a step launched before
        # the last one is read (steps.py) may start after the last one's whole path, though the text has ended
        width = self.tree.topology.max_depth + 1  # the most tokens a step keeps
        session = self.verifier.start(capacity=len(prompt_ids) + budget + self.tree.topology.size + width)
        if resume is not None and resume.verified_kv is not None and resume.verified_hidden is not None \
                and hasattr(session, "adopt"):
            session.adopt(resume.verified_kv())  # no prefill: the KV and hidden states came along
            hidden = resume.verified_hidden
        else:
            out = session.prefill(prompt)
            hidden = out.hidden
        if resume is not None:
            root = torch.tensor([stopper.tokens[-1]], device=self.device)
        elif generator is None:
            root = out.logits[-1].argmax(-1, keepdim=True)
        else:
            root = torch.multinomial(target_probs(out.logits[-1:], sampling)[0], 1, generator=generator)
        state = self.drafter.start(prompt, hidden) if self.drafter is not None else None
        out = hidden = None
        t1 = self.clock()
        result = GenerationResult("", stopper.tokens, len(prompt_ids), "", steps=1, seconds=0.0, accepted=[1])
        if resume is not None:
            result.accepted = list(resume.result.accepted)
            result.steps = len(result.accepted)
        result.time_prefill = t1 - t0
        started = t0 if resume is None else resume.started
        if progress is not None:
            progress.append(Progress(prompt_ids, stopper, sampling, generator, result, started,
                                     getattr(session, "verified_kv", None)))
        switch = DraftingSwitch(self.costs, adaptive=self.adaptive and (generator is None or sampling.seed is None),
                                memory=self.pauses)
        read = StepRead(self.device)
        ahead = self.launch_ahead and generator is None and getattr(session, "keeps_in_place", False)
        steps = StepLauncher(self, session, state, root, sampling, generator, ahead, result)
        pending = None  # a step launched before the last one was read
        delta = stopper.push(int(root)) if resume is None else ""  # a resumed decoding's newest token is out
        while True:
            if delta:
                yield delta
            if stopper.done:
                break
            step_start = time.perf_counter()
            tb = self.clock()
            launching = result.time_draft + result.time_verify
            step = pending or steps.launch(self._drafts(switch.draft_next(), session.length))
            read.start(step.readout)  # the step's one read from the device
            # the next step, queued while the host reads, detokenizes and checks this one, where it needs nothing
            # this one's read gives: this one settled (its keep queued) and at least one more token to come
            pending = None
            if (step.settled and steps.ahead and len(stopper.tokens) + 1 < stopper.max_new_tokens
                    and session.length + 3 * width < self.limit):
                pending = steps.launch(self._drafts(switch.draft_after(step.drafting), session.length + width))
            *path_ids, root_token, length = read.result()
            emitted = len(stopper.tokens)
            delta = stopper.push_step(path_ids[1:length] + [root_token])
            emitted = len(stopper.tokens) - emitted
            result.steps += 1
            result.accepted.append(emitted)
            result.plain_steps += not step.drafting and self.drafter is not None
            if not stopper.done:
                steps.settle(step, length)
            # a turn that launched a step of the other kind timed that launch too: not this step's cost (adaptive.py)
            alone = pending is None or pending.drafting == step.drafting
            switch.record(step.drafting, emitted, time.perf_counter() - step_start if alone else None)
            result.time_other += self.clock() - tb - (result.time_draft + result.time_verify - launching)
        result.seconds = self.clock() - started
        if progress:
            progress[0].verified_kv = None  # finished: nothing will continue it, so its cache need not outlive it
        result.finish_reason = stopper.finish_reason
        result.text = stopper.text
        return result
