"""One generation's steps: each is launched (drafted, scored, accepted and, where it can be, kept) before the host
reads it, and settled after.

Why: on a GPU the host's part of a speculative step (reading the accepted path, detokenizing, checking stops,
launching the next step's kernels) left the device idle. Measured on an H200 with the default model in float32,
a speculative step synchronised at each stage split into drafting 0.88 ms, verification 1.18 ms and 2.05 ms of
the rest (docs/gpu/graph_check_fp32_session11_h200.txt). A step needs nothing of the host but its root, which is
the last step's token and already on the device, once the last step's bookkeeping is done on the device too: the
slot cache keeps the accepted path and grows its length there (``SlotSession.keep_ahead``), the drafter extends
its state by a count it reads there (``GraphedDrafter.advance_counted``). Such a step is *settled* at launch, and
the loop (generate.py) launches the next one before it reads this one, so the device runs a step while the host
handles the one before. The host's lengths follow once it has read them (``confirm``).

Greedy decoding on a slot cache only: a sampled step draws from the request's generator, which a decoding moved
into the server's batch takes along, and a growing cache keeps what a forward wrote. A plain step is settled at
launch everywhere: it keeps its one token whatever it is. What is drafted and accepted is the same either way;
only when the host learns of it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .acceptance import Accepted, greedy_accept, sample_accept
from .sampling import SamplingConfig
from .tree import TreeBuffers


@dataclass
class LaunchedStep:
    """A step whose kernels are queued. ``readout`` is what the host reads of it: the path's tokens (root first,
    padded), the base's next token, the path's length."""

    drafting: bool
    tree: TreeBuffers
    path_tokens: torch.Tensor
    accepted: Accepted
    hidden: torch.Tensor  # the base's final hidden states of every tree node
    settled: bool  # its keep (and the drafter's advance) are queued: after its read only the host's lengths move

    @property
    def readout(self) -> torch.Tensor:
        return torch.cat([self.path_tokens, self.accepted.next_token.reshape(1), self.accepted.length.reshape(1)])


class StepLauncher:
    """Launches and settles the steps of one generation on one session. ``ahead``: keeps are made on the device
    (greedy, slot cache), so a settled step lets the next one be launched before it is read."""

    def __init__(self, decoder, session, state, root: torch.Tensor, sampling: SamplingConfig,
                 generator: torch.Generator | None, ahead: bool, result):
        self.decoder = decoder
        self.drafter = decoder.drafter
        self.session = session
        self.state = state  # the drafter's
        self.root = root  # the next step's root: the base's last token, (1,) on the device
        self.sampling = sampling
        self.generator = generator
        self.ahead = ahead
        self.counted = ahead and hasattr(self.drafter, "advance_counted")  # speculative steps settle at launch
        self.unseen = []  # (tokens, hidden) verified on plain steps, which the drafter reads before it drafts again
        self.result = result  # its time_draft (proposing, and reading the accepted path into the drafter's state) and
        # time_verify (scoring, accepting, keeping): host time launching (device time where synchronised)

    def launch(self, drafting: bool) -> LaunchedStep:
        clock = self.decoder.clock
        tree = self.decoder.tree if drafting else self.decoder.root_only
        start = clock()
        if drafting:
            if self.unseen:
                self.drafter.advance(self.state, *(torch.cat(parts) for parts in zip(*self.unseen)))
                self.unseen.clear()
            tokens = self.drafter.propose(self.state, self.root, tree)
            drafted = clock()
            self.result.time_draft += drafted - start
            start = drafted
        else:
            tokens = self.root
        out = self.session.score(tokens, tree)
        if self.generator is None:
            accepted = greedy_accept(tokens, out.logits, tree)
        else:
            accepted = sample_accept(tokens, out.logits, tree, self.sampling, self.generator)
        step = LaunchedStep(drafting, tree, tokens[accepted.path], accepted, out.hidden, settled=False)
        if not drafting:  # one token, kept whatever it is
            if self.ahead:
                self.session.keep_ahead(accepted.path, accepted.length, tree)
            else:
                self.session.keep(accepted.path, 1, tree)
            if self.drafter is not None:
                self.unseen.append((step.path_tokens[:1], out.hidden[accepted.path[:1]]))
            self._settled(step)
        elif self.counted:
            self.session.keep_ahead(accepted.path, accepted.length, tree)
        verified = clock()
        self.result.time_verify += verified - start
        if drafting and self.counted:  # the drafter reading the accepted path: drafting's time (since session 27)
            self.drafter.advance_counted(self.state, step.path_tokens, out.hidden[accepted.path], accepted.length)
            self._settled(step)
            self.result.time_draft += clock() - verified
        return step

    def _settled(self, step: LaunchedStep) -> None:
        step.settled = True
        self.root = step.accepted.next_token.reshape(1)

    def settle(self, step: LaunchedStep, length: int) -> None:
        """After the step's read (``length``: its path's): the host's lengths catch up, or a step not settled at
        launch keeps its path now."""
        if not step.settled:
            clock = self.decoder.clock
            start = clock()
            self.session.keep(step.accepted.path, length, step.tree)
            kept = clock()
            self.result.time_verify += kept - start
            self.drafter.advance(self.state, step.path_tokens[:length], step.hidden[step.accepted.path[:length]])
            self.root = step.accepted.next_token.reshape(1)
            self.result.time_draft += clock() - kept
        elif self.ahead:
            self.session.confirm(length)
            if step.drafting:
                self.drafter.confirm(self.state, length)
