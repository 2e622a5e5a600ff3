"""Train a Chimera drafter against its frozen base on distilled data.

Exact resume: the data order and the sampled chain roots are pure functions of (seed, step), and a
checkpoint holds the drafter, the optimizer moments and the step, so a run killed and resumed follows the
same trajectory as one that never stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from ..drafters import feature_layers_of, load_any, new_drafter
from ..drafters.persist import odds_line_valid
from ..identity import base_identity, describe, same_base
from ..errors import ChimeraError
from ..inputs import read_bytes, read_json
from ..target import feature_states
from .data import count_tokens
from .losses import acceptance_counts, chain_counts, chain_events, chain_loss, confidence_counts

STATE_WEIGHTS = "optimizer.safetensors"
STATE_JSON = "trainer_state.json"


class TrainingState(BaseModel):
    """A checkpoint's trainer_state.json: the step reached, the optimizer's groups and the run's settings."""

    model_config = ConfigDict(extra="forbid", strict=True)
    step: Annotated[int, Field(ge=0)]
    param_groups: list[dict]
    config: dict


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    # the window every sample is cut to, prompt first; None: the longest sample's length. (512 before session 23 cut
    # the answers to long prompts out of training, and no position past 511 was trained: docs/training.md,
    # "Long prompts")
    max_len: int | None = None
    roots_per_seq: int = 64  # chains sampled per sequence and step
    depth: int = 6  # draft heads trained (and tree depth usable at inference)
    architecture: str = "chimera"  # or "medusa": the baseline heads, trained by the same pipeline
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    depth_decay: float = 0.8
    regression_weight: float = 0.1
    kl: bool = False  # KL to the base distribution instead of cross-entropy on its argmax
    # the base's hidden states after these layers, fused at a Chimera drafter's input beside the final ones
    # (EAGLE-3's features from low, middle and high layers); none: the final ones alone
    feature_layers: list[int] = field(default_factory=list)
    init: str | None = None  # a saved drafter to start from (fine-tuning, or adding heads to it)
    cache_base: bool = False  # keep each sample's base hidden states/argmax in memory (small data, CPU)
    heldout_fraction: float = 0.02
    eval_every: int = 250
    eval_samples: int = 64
    save_every: int = 500
    seed: int = 0


def warm_start(drafter, source, path) -> None:
    """Start ``drafter`` from a trained ``source`` of the same kind and base. A deeper ``drafter`` gets each
    extra head as a copy of the source's last one: the nearest depth is its best available guess. A ``drafter`` reading
    more feature layers than the source starts with their fuse columns at zero (grown_fuse_weight)."""
    if type(source) is not type(drafter):
        raise ChimeraError(f"--init {path} is a {type(source).__name__}, "
                           f"but this run trains a {type(drafter).__name__}")
    layers, wanted = feature_layers_of(source), feature_layers_of(drafter)
    if not set(layers) <= set(wanted):
        raise ChimeraError(f"--init {path} reads the base's states after layers {list(layers)} beside its final "
                           f"ones, but this run's --feature-layers are {list(wanted)}: give them all")
    have, want = source.config.num_draft_heads, drafter.config.num_draft_heads
    if have > want:
        raise ChimeraError(f"--init {path} has {have} heads, more than --depth {want}")
    source_state = source.state_dict()
    if layers != wanted:
        source_state["fuse.weight"] = grown_fuse_weight(source_state["fuse.weight"], layers, wanted)
    per_head = re.compile(rf"^({'|'.join(drafter.per_head_modules)})\.(\d+)\.")
    state = {}
    for key, value in drafter.state_dict().items():
        match = per_head.match(key)
        if match and int(match.group(2)) >= have:
            key_in_source = per_head.sub(rf"\g<1>.{have - 1}.", key)
        else:
            key_in_source = key
        if key_in_source not in source_state or source_state[key_in_source].shape != value.shape:
            found = tuple(source_state[key_in_source].shape) if key_in_source in source_state else "nothing"
            raise ChimeraError(f"--init {path} does not fit this drafter: {key} needs shape {tuple(value.shape)}, "
                               f"the saved drafter has {found}")
        state[key] = source_state[key_in_source]
    drafter.load_state_dict(state)


def check_data_base(meta: dict, identity: dict, data: str = "the data") -> None:
    """Refuse distilled data (its ``meta.json``) made with another base than the loaded one (``identity``)."""
    if not same_base(meta.get("base", {}), identity):
        raise ChimeraError(f"{data} was made with base {describe(meta.get('base', {}))}, but the loaded base is "
                           f"{describe(identity)}: train on the data of one base")


def grown_fuse_weight(weight: torch.Tensor, layers, wanted) -> torch.Tensor:
    """A Chimera drafter's fuse weight over the feature layers ``wanted`` made from one over ``layers`` (a subset):
    the columns of a layer the source read are its own, those of a new layer zeros, so the grown drafter drafts
    exactly as the source until training gives the new features a weight (EAGLE-3's low, middle and high features
    added to a trained drafter, issue #18)."""
    d = weight.shape[0]
    blocks = dict(zip([*layers, "final", "g"], weight.split(d, dim=1)))
    return torch.cat([blocks.get(layer, torch.zeros_like(blocks["g"])) for layer in [*wanted, "final", "g"]], dim=1)


def split_heldout(n: int, fraction: float, seed: int, groups: list[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices to train on and to hold out, about ``fraction`` of them held out. ``groups``: a name per sample
    (its prompt's id, where several answers to one prompt are trained on: greedy and sampled ones); every sample of
    a group falls on the same side, so that no held-out answer has a twin to the same prompt in training."""
    if groups is None:
        order = np.random.default_rng(seed + 12345).permutation(n)
        held = max(1, int(round(n * fraction))) if n > 1 and fraction > 0 else 0
        return np.sort(order[held:]), np.sort(order[:held])
    names, group_of = np.unique(np.asarray(groups), return_inverse=True)  # the names sorted, each sample's among them
    is_held = np.isin(group_of, split_heldout(len(names), fraction, seed)[1])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def batch_indices(train_ids: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Which samples step ``step`` trains on: epoch-wise permutations, a pure function of (seed, step)."""
    per_epoch = max(1, len(train_ids) // batch_size)
    epoch, slot = divmod(step, per_epoch)
    order = np.random.default_rng(seed * 1_000_003 + epoch).permutation(len(train_ids))
    return train_ids[order[slot * batch_size: (slot + 1) * batch_size]]


def with_window(cfg: TrainConfig, samples) -> TrainConfig:
    """``cfg`` with its window resolved: a ``max_len`` of None becomes the longest sample's length."""
    if cfg.max_len is not None:
        return cfg
    return replace(cfg, max_len=max(len(tokens) for tokens, _ in samples))


def collate(samples, ids, max_len: int, pad_id: int, device):
    """Right-pad to the longest sample (at most max_len). loss_mask[t]: the token after t is an assistant one."""
    seqs = [samples[i] for i in ids]
    width = min(max_len, max(len(t) for t, _ in seqs))
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (t, m) in enumerate(seqs):
        n = min(width, len(t))
        tokens[row, :n] = torch.from_numpy(t[:n])
        attention[row, :n] = 1
        loss_mask[row, : n - 1] = torch.from_numpy(m[1:n])
    return tokens.to(device), attention.to(device), loss_mask.to(device)


def sample_roots(loss_mask: torch.Tensor, count: int, seeds: list[int]) -> torch.Tensor:
    """Pick ``count`` chain roots per row, uniformly among positions whose chains have a target; row i's draw is
    a pure function of ``seeds[i]`` (its sample and step), so it does not depend on the batch it sits in nor on
    how a data-parallel run split that batch."""
    B, L = loss_mask.shape
    if count >= L:
        return torch.arange(L, device=loss_mask.device).expand(B, L)
    weights = loss_mask.float().cpu() + 1e-6  # rows without targets still sample (and are masked later)
    roots = torch.stack([torch.multinomial(w, count, replacement=False, generator=torch.Generator().manual_seed(s))
                         for w, s in zip(weights, seeds)])
    return roots.sort(-1).values.to(loss_mask.device)


def root_seed(seed: int, step: int, sample: int) -> int:
    return (seed * 7919 + step) * 1_000_003 + sample


@torch.no_grad()
def base_targets(model, tokens, attention, features: tuple[int, ...] = ()):
    """The base's hidden states a drafter reads (after ``features`` and the final ones: target.feature_states) and
    its logits, for a batch of right-padded samples."""
    out = model(input_ids=tokens, attention_mask=attention, output_hidden_states=True)
    return feature_states(out.hidden_states, features), out.logits


class BaseOutputCache:
    """The frozen base's hidden states and argmax per sample, computed once. With right padding a sample's
    outputs do not depend on its batch, so cached and fresh batches are identical."""

    def __init__(self, model, features: tuple[int, ...] = ()):
        self.model = model
        self.features = features
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, ids, tokens, attention):
        missing = [row for row, i in enumerate(ids) if int(i) not in self.store]
        if missing:
            hidden, logits = base_targets(self.model, tokens[missing], attention[missing], self.features)
            for j, row in enumerate(missing):
                n = int(attention[row].sum())
                self.store[int(ids[row])] = (hidden[j, :n].clone(), logits[j, :n].argmax(-1))
        B, L = tokens.shape
        d = self.store[int(ids[0])][0].shape[-1]
        hidden = tokens.new_zeros((B, L, d), dtype=self.store[int(ids[0])][0].dtype)
        targets = tokens.new_zeros((B, L))
        for row, i in enumerate(ids):
            h, t = self.store[int(i)]
            hidden[row, : h.shape[0]] = h
            targets[row, : t.shape[0]] = t
        return hidden, targets


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(out_dir: Path, drafter, optimizer, step: int, cfg: TrainConfig, evals: dict) -> Path:
    """Write step-N/ atomically (temporary dir, then rename), point ``latest`` at it, drop older ones."""
    from safetensors.torch import save_file

    name = f"step-{step:07d}"
    final = out_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        drafter.save(tmp / "drafter", extra_config={"training": {**asdict(cfg), "step": step, "eval": evals}})
        for item in (tmp / "drafter").iterdir():
            os.replace(item, tmp / item.name)
        (tmp / "drafter").rmdir()
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / STATE_WEIGHTS))
        (tmp / STATE_JSON).write_text(json.dumps({"step": step, "param_groups": groups, "config": asdict(cfg)}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = out_dir / "latest"
    (out_dir / "latest.tmp").write_text(name + "\n")
    os.replace(out_dir / "latest.tmp", latest)
    for old in out_dir.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_tensors(optimizer) -> tuple[dict, list]:
    state = optimizer.state_dict()
    tensors = {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{pid}.{key}"] = tensor.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def load_optimizer(optimizer, directory: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / STATE_WEIGHTS))
    groups = read_json(directory / STATE_JSON, TrainingState, "checkpoint").param_groups
    state: dict = {}
    for name, tensor in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "latest"
    if not pointer.is_file():
        return None
    name = read_bytes(pointer, "checkpoint pointer", limit=4096).decode("utf-8", errors="replace").strip()
    path = out_dir / name
    if not name or "/" in name or not (path / STATE_JSON).is_file():
        raise ChimeraError(f"checkpoint pointer {pointer} names no checkpoint of {out_dir}: the run directory is "
                           "damaged (delete it, or pass --no-resume)")
    return path


@torch.no_grad()
def evaluate(model, drafter, samples, ids, cfg: TrainConfig, pad_id: int, device,
             roots_per_pass: int | None = None, confidence_table: bool = False) -> dict:
    """Per-depth top-1 agreement with the base on held-out samples, over every chain root, the acceptance profile and
    the acceptance odds (``confidence_table``: and the binned counts the odds are fitted to). The chains go through the
    drafter ``roots_per_pass`` roots a sample at a time (default: the training's ``roots_per_seq``): every root at
    once made logits of batch x length x depth x vocabulary, 25 GB at the default model's settings once accelerate
    casts them to float32, which ran two of three trainings sharing an 80 GB H100 out of memory (session 22)."""
    if len(ids) == 0:
        return {}
    hits = np.zeros(cfg.depth)
    counts = np.zeros(cfg.depth)
    ranks = np.zeros((cfg.depth, MAX_RANK + 1))
    confidence = np.zeros((cfg.depth, 3, CONFIDENCE_BINS))
    for start in range(0, len(ids), cfg.batch_size):
        tokens, attention, loss_mask = collate(samples, ids[start: start + cfg.batch_size], cfg.max_len, pad_id,
                                               device)
        hidden, logits = base_targets(model, tokens, attention, feature_layers_of(drafter))
        targets = logits.argmax(-1)
        every_root = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        for roots in every_root.split(roots_per_pass or cfg.roots_per_seq, dim=1):
            out_logits, out_u = drafter(tokens, hidden, cfg.depth, roots)
            loss = chain_loss(out_logits, out_u, roots, targets, hidden, loss_mask)
            hits += np.array(loss.per_depth_top1) * np.array(loss.per_depth_count)
            counts += np.array(loss.per_depth_count)
            events = chain_events(out_logits, roots, targets, loss_mask)
            ranks += acceptance_counts(events, MAX_RANK).numpy()
            confidence += confidence_counts(out_logits, events, CONFIDENCE_BINS, CONFIDENCE_TOP).numpy()
            del out_logits, out_u, events
    result = {"top1": [round(float(h / max(c, 1)), 4) for h, c in zip(hits, counts)],
              "chains": [int(c) for c in counts], "acceptance": acceptance_profile(ranks),
              "acceptance_odds": acceptance_odds(confidence)}
    if confidence_table:
        result["confidence"] = confidence.tolist()
    return result


MAX_RANK = 8  # candidates per node whose acceptance the evaluation records
CONFIDENCE_BINS = 20  # probability bins the acceptance odds are fitted over
CONFIDENCE_TOP = 4  # candidates per chain and depth binned (a dynamic tree's beam takes 8, mostly unlikely ones)
MIN_FITTED = 200  # candidates a depth needs before its odds are fitted


def acceptance_odds(confidence: np.ndarray, steps: int = 50) -> list[list[float]] | None:
    """Per head, from the first: (slope, intercept) of logit(acceptance) = slope * logit(probability) + intercept, a
    logistic regression over the head's probability bins (``losses.confidence_counts``; each bin's candidates at their
    mean probability) by Newton's method. A dynamic tree scores its paths by it (drafters/chimera.py, ``odds_line``).
    Measured on the shipped drafter's unseen answers (scripts/acceptance_profile.py): the first head slightly
    over-confident, each deeper one more under-confident given that the drafts above it were right (a depth-8
    candidate at 0.48 was the base's token 78 % of the time). The list stops at the first head with too few
    candidates or no increasing fit; None if that is the first."""
    lines = []
    for seen, right, mass in confidence:
        used = seen > 0
        if seen.sum() < MIN_FITTED or right.sum() == 0 or right.sum() == seen.sum():
            break
        p = np.clip(mass[used] / seen[used], 1e-4, 1 - 1e-4)
        x = np.stack([np.log(p / (1 - p)), np.ones_like(p)], 1)
        w = np.array([1.0, 0.0])
        for _ in range(steps):
            mu = 1 / (1 + np.exp(-(x @ w)))
            hessian = x.T @ (x * (seen[used] * mu * (1 - mu))[:, None]) + 1e-6 * np.eye(2)
            w = w + np.linalg.solve(hessian, x.T @ (right[used] - seen[used] * mu))
        if not odds_line_valid(float(w[0]), float(w[1])):
            break
        lines.append([round(float(w[0]), 4), round(float(w[1]), 4)])
    return lines or None


def acceptance_profile(ranks: np.ndarray) -> list[list[float]]:
    """p[k][r]: how often head k+1's rank-r candidate is the base's token, given the chain so far was right
    (the last column counts "not among the first MAX_RANK"). Trees are built from it (tree.from_profile)."""
    totals = ranks.sum(-1, keepdims=True)
    return np.round(ranks[:, :MAX_RANK] / np.maximum(totals, 1), 5).tolist()


def train(model, samples, out_dir, cfg: TrainConfig, *, data_meta: dict | None = None, resume: bool = True,
          progress: bool = True, accelerator=None, max_steps_this_run: int | None = None,
          export_dtype: torch.dtype | None = None, groups: list[str] | None = None) -> dict:
    """Train (or resume) a drafter; returns the final held-out evaluation. ``max_steps_this_run`` stops early
    after that many steps (used to test resume). ``groups``: each sample's prompt id where a prompt has several
    answers (``split_heldout``)."""
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    probe = out_dir / f".write-test-{os.getpid()}"  # one per process: data-parallel ranks start together
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ChimeraError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    if data_meta is not None:
        check_data_base(data_meta, base_identity(model))
    if len(samples) < 2:
        raise ChimeraError(f"need at least 2 training samples, got {len(samples)}")
    cfg = with_window(cfg, samples)  # before anything reads or saves it: a resumed run compares the number
    device_type = next(model.parameters()).device.type
    if accelerator is None:
        accelerator = Accelerator(mixed_precision="bf16" if device_type == "cuda" else "no", cpu=device_type == "cpu")
    device = accelerator.device
    if cfg.batch_size < accelerator.num_processes:
        raise ChimeraError(f"the batch ({cfg.batch_size}) is smaller than the number of processes "
                           f"({accelerator.num_processes}): every process needs at least one sample a step")
    pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    if groups is not None and len(groups) != len(samples):
        raise ValueError(f"{len(groups)} groups for {len(samples)} samples")
    train_ids, held_ids = split_heldout(len(samples), cfg.heldout_fraction, cfg.seed, groups)
    held_ids = held_ids[: cfg.eval_samples]

    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        saved = read_json(checkpoint / STATE_JSON, TrainingState, "checkpoint").model_dump()
        if saved["config"] != asdict(cfg):
            changed = sorted(k for k in set(saved["config"]) | set(asdict(cfg))
                             if saved["config"].get(k) != asdict(cfg).get(k))
            raise ChimeraError(f"{out_dir} holds a run with other settings ({', '.join(changed)}): "
                               "use the same settings to resume, or another --out directory")
        drafter = load_any(checkpoint, model, dtype=torch.float32).requires_grad_(True)
        start_step = saved["step"]
    else:
        drafter = new_drafter(cfg.architecture, model, num_draft_heads=cfg.depth, seed=cfg.seed,
                              feature_layers=cfg.feature_layers).float()
        if cfg.init:
            warm_start(drafter, load_any(cfg.init, model, dtype=torch.float32), cfg.init)
        else:
            tokens, attention, _ = collate(samples, train_ids[: cfg.batch_size], cfg.max_len, pad_id, device)
            drafter.calibrate_head_norm(base_targets(model, tokens, attention, feature_layers_of(drafter))[0][
                attention.bool()])
        start_step = 0
    features = feature_layers_of(drafter)  # what the base's forward returns for it, a resumed one's as saved
    drafter.train()
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    if checkpoint is not None:
        load_optimizer(optimizer, checkpoint)
    drafter, optimizer = accelerator.prepare(drafter, optimizer)
    if cfg.cache_base and cfg.kl:
        raise ChimeraError("cache_base keeps only the base's argmax: it cannot be combined with kl")
    base_cache = BaseOutputCache(model, features) if cfg.cache_base else None
    log_path = out_dir / "log.jsonl"
    evals = {}
    end_step = cfg.steps if max_steps_this_run is None else min(cfg.steps, start_step + max_steps_this_run)
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", disable=not progress or not accelerator.is_main_process)
    t0 = time.perf_counter()
    for step in range(start_step, end_step):
        for group in optimizer.param_groups:  # the schedule is a pure function of the step
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        ids = batch_indices(train_ids, step, cfg.batch_size, cfg.seed)
        ids = ids[accelerator.process_index:: accelerator.num_processes]
        tokens, attention, loss_mask = collate(samples, ids, cfg.max_len, pad_id, device)
        if base_cache is not None:
            hidden, targets = base_cache(ids, tokens, attention)
            logits = None
        else:
            hidden, logits = base_targets(model, tokens, attention, features)
            targets = logits.argmax(-1)
        roots = sample_roots(loss_mask, cfg.roots_per_seq, [root_seed(cfg.seed, step, int(i)) for i in ids])
        totals = None
        if accelerator.num_processes > 1:  # every depth's chain count over all processes: the mean's divisor
            totals = accelerator.reduce(chain_counts(roots, loss_mask, cfg.depth), "sum").tolist()
        with accelerator.autocast():
            out_logits, out_u = drafter(tokens, hidden, cfg.depth, roots)
            loss = chain_loss(out_logits, out_u, roots, targets, hidden, loss_mask,
                              teacher_logits=logits if cfg.kl else None, depth_decay=cfg.depth_decay,
                              regression_weight=cfg.regression_weight, totals=totals,
                              processes=accelerator.num_processes)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss.loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        batch_loss = loss.loss.detach()
        if accelerator.num_processes > 1:  # the shares of the whole batch's loss, summed
            batch_loss = accelerator.reduce(batch_loss, "sum") / accelerator.num_processes
        record = {"step": done, "loss": round(float(batch_loss), 5), "lr": optimizer.param_groups[0]["lr"],
                  "ce": [round(x, 4) for x in loss.per_depth_ce], "top1": [round(x, 4) for x in loss.per_depth_top1],
                  "elapsed_s": round(time.perf_counter() - t0, 2)}
        if device.type == "cuda":  # what a run needs of the card, to know how many fit beside each other
            record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            drafter.eval()
            with accelerator.autocast():
                evals = evaluate(model, accelerator.unwrap_model(drafter), samples, held_ids, cfg, pad_id, device)
            drafter.train()
            record["heldout"] = evals
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if done % cfg.save_every == 0 or done == end_step:
                save_checkpoint(out_dir, accelerator.unwrap_model(drafter), optimizer, done, cfg, evals)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{loss.per_depth_top1[0]:.2f}")
    bar.close()
    if accelerator.is_main_process and end_step == cfg.steps:
        export = out_dir / "drafter"
        final = accelerator.unwrap_model(drafter)
        if hasattr(final, "token_counts"):
            seen = (samples[i] for i in train_ids)
            final.token_counts = torch.from_numpy(count_tokens(seen, final.config.vocab_size))
        final.save(
            export, extra_config={"acceptance": evals.get("acceptance"),
                                  "acceptance_odds": evals.get("acceptance_odds"),
                                  "training": {**asdict(cfg), "step": cfg.steps, "eval": evals,
                                               "data": (data_meta or {}).get("source")}}, dtype=export_dtype)
    accelerator.wait_for_everyone()  # no rank leaves (and tears its process group down) while rank 0 still writes
    return {"step": end_step, "heldout": evals, "size": drafter_size(accelerator.unwrap_model(drafter), model)}


def drafter_size(drafter, model) -> dict:
    """The drafter's own parameters (the base's embeddings and head are shared, not counted) against the base's,
    and the extra elements it precomputes for inference on a CPU (a Chimera drafter's trigram tables, 3 x vocab x
    hidden; a GPU computes the encoding directly and keeps none)."""
    own = sum(p.numel() for p in drafter.parameters())
    base = sum(p.numel() for p in model.parameters())
    config = getattr(drafter, "config", None)
    tables = 3 * (config.vocab_size + 1) * config.hidden_size if hasattr(drafter, "trigram_tables") else 0
    return {"drafter_parameters": own, "base_parameters": base, "drafter_to_base": round(own / base, 4),
            "inference_table_elements": tables, "inference_tables_to_base": round(tables / base, 4)}
