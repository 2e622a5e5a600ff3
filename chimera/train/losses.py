"""The drafter's training objective over unrolled draft chains (see ChimeraDrafter.unrolled_forward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor
    per_depth_ce: list[float]
    per_depth_top1: list[float]  # agreement of the head's argmax with the base's argmax
    per_depth_count: list[int]
    regression: float


def chain_positions(roots: torch.Tensor, loss_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For depth k: the position t = r+k-1 each chain's prediction is compared at (clamped into the sequence),
    and whether it counts: inside the sequence, r >= 1 (a verified prefix exists) and ``loss_mask[t]`` set (an
    assistant token follows t)."""
    L = loss_mask.shape[1]
    t = roots + (k - 1)
    inside = t < L
    t = t.clamp(max=L - 1)
    return t, inside & (roots >= 1) & torch.gather(loss_mask, 1, t)


def chain_counts(roots: torch.Tensor, loss_mask: torch.Tensor, depth: int) -> torch.Tensor:
    """(depth,) how many chains count at each depth: what a data-parallel run sums over its processes, so that
    each process's loss is its share of the whole batch's mean (``chain_loss``'s ``totals``)."""
    return torch.stack([chain_positions(roots, loss_mask, k)[1].sum() for k in range(1, depth + 1)])


def chain_loss(logits, us, roots, base_targets, hidden, loss_mask, *, teacher_logits=None,
               depth_decay: float = 0.8, regression_weight: float = 0.1, totals: list[int] | None = None,
               processes: int = 1) -> LossOutput:
    """Loss for the chains rooted at ``roots`` (B, m).

    At depth k the chain rooted at r predicts the token after position t = r+k-1, so it is compared with the
    base at t: its argmax ``base_targets[:, t]`` (cross-entropy) or its full distribution ``teacher_logits``
    (KL), and ``u`` with the base's final hidden state at t (the end of ``hidden[:, t]``, target.feature_states).
    Only positions with ``loss_mask`` set (an assistant token follows them) and roots r >= 1 (a verified prefix
    exists) count.

    Each depth's terms are means over its chains. In a data-parallel run of ``processes`` processes, ``totals``
    gives each depth's chain count over all of them: the sums here are divided by those and multiplied by
    ``processes`` (gradients are averaged over processes), so the update is the whole batch's, whatever the
    split. The logged values stay this process's own means.
    """
    B, L = base_targets.shape
    total = logits[0].new_zeros((), dtype=torch.float32)
    ce_log, top1_log, counts, reg_total = [], [], [], 0.0
    for k, (lg, u) in enumerate(zip(logits, us), start=1):
        t, valid = chain_positions(roots, loss_mask, k)
        n = int(valid.sum())
        if n == 0:  # no chain of this depth here; zero-weighted, its head still takes part in the backward
            total = total + lg.sum() * 0 + (u.sum() * 0 if u is not None else 0)  # (data-parallel waits for it)
            ce_log.append(0.0), top1_log.append(0.0), counts.append(0)
            continue
        share = processes * n / totals[k - 1] if totals is not None else 1.0  # this process's part of the mean
        lg_v = lg[valid].float()
        target = torch.gather(base_targets, 1, t)[valid]
        if teacher_logits is not None:
            teacher = teacher_logits[torch.arange(B, device=t.device)[:, None].expand_as(t)[valid], t[valid]]
            ce = F.kl_div(lg_v.log_softmax(-1), teacher.float().log_softmax(-1), log_target=True,
                          reduction="batchmean")
        else:
            ce = F.cross_entropy(lg_v, target)
        weight = depth_decay ** (k - 1)
        if u is None:  # drafters without a hidden-state estimate (Medusa heads)
            reg = torch.zeros((), device=ce.device)
        else:
            final = hidden[..., -u.shape[-1]:]  # the base's final states, which end what a drafter reads
            h_t = torch.gather(final, 1, t.unsqueeze(-1).expand(-1, -1, final.shape[-1]))[valid]
            reg = F.smooth_l1_loss(u[valid].float(), h_t.float())
        total = total + share * weight * (ce + regression_weight * reg)
        ce_log.append(float(ce.detach()))
        top1_log.append(float((lg_v.detach().argmax(-1) == target).float().mean()))
        counts.append(n)
        reg_total += float(reg.detach())
    if not any(counts) and torch.is_grad_enabled():
        total = total + logits[0].sum() * 0  # a batch without targets still backpropagates (zero gradients)
    return LossOutput(total, ce_log, top1_log, counts, reg_total / max(1, len(logits)))


@torch.no_grad()
def chain_events(logits, roots, base_targets, loss_mask) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per depth k: the base's token where head k drafts (B, m), whether each chain reaches depth k, i.e. its drafts
    were right up to depth k - 1 within its answer (the event that a tree node at depth k is reached), and the rank
    of the base's token among head k's candidates (0: its top draft)."""
    L = base_targets.shape[1]
    alive = roots >= 1
    events = []
    for k, lg in enumerate(logits, start=1):
        t = roots + (k - 1)
        inside = t < L
        t = t.clamp(max=L - 1)
        alive = alive & inside & torch.gather(loss_mask, 1, t)
        target = torch.gather(base_targets, 1, t)
        rank = (lg > torch.gather(lg, -1, target.unsqueeze(-1))).sum(-1)
        events.append((target, alive, rank))
        alive = alive & (rank == 0)
    return events


def acceptance_counts(events, max_rank: int) -> torch.Tensor:
    """(depth, max_rank + 1) counts of the rank of the base's token among head k's candidates, over the chains that
    reach depth k (``chain_events``). The last column counts ranks >= max_rank."""
    return torch.stack([torch.bincount(rank.clamp(max=max_rank)[alive], minlength=max_rank + 1)
                        for _, alive, rank in events]).cpu()  # one transfer, not one a depth


@torch.no_grad()
def confidence_counts(logits, events, bins: int, top: int) -> torch.Tensor:
    """(depth, 3, bins), float64: head k's ``top`` likeliest candidates of every chain that reaches depth k, binned by
    their probability: how many fell in each bin, how many of those were the base's token, and their summed
    probability. How far a head's probability is its candidates' chance of acceptance (trainer.acceptance_odds)."""
    out = torch.zeros(len(logits), 3, bins, dtype=torch.float64, device=logits[0].device)
    for k, (lg, (target, alive, _)) in enumerate(zip(logits, events)):
        probs, tokens = lg[alive].float().softmax(-1).topk(top, dim=-1)
        right = (tokens == target[alive].unsqueeze(-1)).flatten().double()
        probs = probs.flatten().double()
        where = (probs * bins).long().clamp(max=bins - 1)
        out[k, 0] = torch.bincount(where, minlength=bins)
        out[k, 1] = torch.bincount(where, weights=right, minlength=bins)
        out[k, 2] = torch.bincount(where, weights=probs, minlength=bins)
    return out.cpu()  # one transfer, not three a depth
