"""Saving and loading drafter directories (config.json + model.safetensors), shared by every drafter kind.

Writes go to a temporary directory that is renamed into place, so an interrupted save never leaves a
directory that a later load would trust.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import ChimeraError
from ..identity import base_identity, describe, same_base
from ..inputs import parse_json, read_bytes, validated

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
COUNTS_NAME = "token_counts.safetensors"  # optional: how often the base writes each token


def save_directory(directory, config: dict, state: dict, token_counts: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if token_counts is not None:
            save_file({"counts": token_counts.detach().cpu().long()}, str(tmp / COUNTS_NAME))
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class DrafterFile(BaseModel):
    """What every drafter's config.json must hold before its own config is read from it."""

    model_config = ConfigDict(extra="allow", strict=True)
    architecture: Literal["chimera", "medusa"] = "chimera"
    base: dict = {}  # identity.base_identity of the base it was built for


def read_config(path) -> dict:
    """The raw config of a drafter directory, with clear errors for every way it can be unusable."""
    path = Path(path)
    if not path.exists():
        raise ChimeraError(f"drafter path {path} does not exist")
    if not path.is_dir():
        raise ChimeraError(f"drafter path {path} is not a directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise ChimeraError(f"drafter directory {path} is missing {name}")
    raw = parse_json(read_bytes(path / CONFIG_NAME, "drafter config"), f"drafter config {path / CONFIG_NAME}")
    validated(DrafterFile, raw, f"drafter config {path / CONFIG_NAME}")
    return raw


def build_config(cls, raw: dict, path):
    """A config dataclass from the raw JSON (strictly typed), ignoring extra keys (training records, trees)."""
    return validated(cls, raw, f"drafter config {Path(path) / CONFIG_NAME}")


def check_sizes(config, model, path) -> None:
    """The config's sizes must be its base's before anything is built from them (a forged hidden_size would
    otherwise allocate what it says)."""
    cfg = model.config.get_text_config()
    vocab = model.get_output_embeddings().weight.shape[0]
    if (config.hidden_size, config.vocab_size) != (cfg.hidden_size, vocab):
        raise ChimeraError(f"drafter config {Path(path) / CONFIG_NAME} has hidden size {config.hidden_size} and "
                           f"vocabulary {config.vocab_size}, but the base has {cfg.hidden_size} and {vocab}")
    check_feature_layers(getattr(config, "feature_layers", []), model, f"drafter config {Path(path) / CONFIG_NAME}")


def check_feature_layers(layers, model, what: str) -> None:
    """A drafter reads the base's hidden states after its layers 0 (the embeddings) to L - 1 beside its final one."""
    count = model.config.get_text_config().num_hidden_layers
    beyond = [i for i in layers if i >= count]
    if beyond:
        raise ChimeraError(f"{what} reads the base's hidden states after layers {beyond}, but the base has {count} "
                           f"layers: choose feature layers in 0..{count - 1}")


def check_base(config_base: dict, model, path) -> None:
    expected = base_identity(model)
    if not same_base(config_base, expected):
        raise ChimeraError(f"drafter {path} was built for base {describe(config_base)} but the loaded base is "
                           f"{describe(expected)} with different weights")


def load_weights(module: torch.nn.Module, path) -> None:
    """Load model.safetensors into ``module``, refusing missing, unexpected or mis-shaped tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ChimeraError(f"drafter weights {path / WEIGHTS_NAME} are unreadable: {exc}") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(x for x in [
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            f"wrong shapes {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:2]]}" if wrong else ""]
            if x)
        raise ChimeraError(f"drafter weights in {path} do not match its config: {detail}")
    module.load_state_dict(state)


def trainable_state(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    return {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in module.state_dict().items()}


def acceptance_profile(raw: dict, heads: int) -> list[list[float]] | None:
    """The measured acceptance profile saved with a drafter (see trainer.acceptance_profile), if well-formed."""
    profile = raw.get("acceptance")
    ok = (isinstance(profile, list) and 0 < len(profile) <= heads
          and all(isinstance(row, list) and row and all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in row)
                  for row in profile))
    return profile if ok else None


def odds_line_valid(slope, intercept) -> bool:
    """A line of acceptance odds worth drafting by: finite numbers, the slope positive (a line that reversed a head's
    order of candidates would be no measurement of it), both within 100."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in (slope, intercept))
    return numbers and 0 < slope <= 100 and abs(intercept) <= 100


def acceptance_odds(raw: dict, heads: int) -> list[tuple[float, float]] | None:
    """The per-head (slope, intercept) lines in log-odds saved with a drafter (trainer.acceptance_odds fits them), if
    well-formed: one valid pair (``odds_line_valid``) per head, for at most every head."""
    lines = raw.get("acceptance_odds")
    ok = (isinstance(lines, list) and 0 < len(lines) <= heads
          and all(isinstance(pair, list) and len(pair) == 2 and odds_line_valid(*pair) for pair in lines))
    return [(float(a), float(b)) for a, b in lines] if ok else None


def load_token_counts(path, vocab_size: int) -> torch.Tensor | None:
    """The optional per-token counts saved beside a drafter (scripts/token_frequencies.py), or None."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / COUNTS_NAME
    if not file.is_file():
        return None
    try:
        counts = load_file(str(file)).get("counts")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ChimeraError(f"token counts {file} are unreadable: {exc}") from None
    if counts is None or counts.shape != (vocab_size,):
        raise ChimeraError(f"token counts {file} must hold 'counts' of shape ({vocab_size},)")
    return counts
