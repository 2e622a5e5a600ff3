"""Drafters propose draft trees; they all implement ``drafters.interface.Drafter``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ChimeraError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "drafters"
ARCHITECTURES = ("chimera", "medusa")
# "auto" draft vocabulary per device type: on a CPU the full projection is ~6 ms of every drafting level
# (SmolLM2, 49,152 tokens, 2 cores), and the 8,192 most written tokens cover 97 % of what the base writes
AUTO_DRAFT_VOCAB = {"cpu": 8192}


def feature_layers_of(drafter) -> tuple[int, ...]:
    """The base's layers whose hidden states ``drafter`` reads beside the final ones (target.feature_states): a
    Chimera drafter's ``feature_layers`` (also through a graphed drafter wrapping it); none for other drafters, or
    none at all."""
    return tuple(getattr(getattr(drafter, "drafter", drafter), "feature_layers", ()))


def shipped_drafter_path(model, architecture: str = "chimera") -> Path | None:
    """The drafter committed with chimera for this base, if any (matched by the base's alias)."""
    name = getattr(model.config, "chimera_source", None)
    if not name:
        return None
    suffix = "" if architecture == "chimera" else f"-{architecture}"
    path = SHIPPED_DIR / (Path(str(name)).name + suffix)
    return path if (path / "config.json").is_file() else None


def new_drafter(architecture: str, model, num_draft_heads: int = 6, seed: int | None = 0, feature_layers=()):
    """A freshly initialised drafter of the named kind, sized for ``model``; a Chimera drafter reading the base's
    hidden states after ``feature_layers`` beside its final ones."""
    if architecture == "chimera":
        from .chimera import ChimeraDrafter

        return ChimeraDrafter.for_base(model, num_draft_heads=num_draft_heads, seed=seed,
                                       feature_layers=feature_layers)
    if feature_layers:
        raise ChimeraError(f"feature layers are the Chimera drafter's input: a {architecture} drafter reads the "
                           "base's final hidden states only")
    if architecture == "medusa":
        from .medusa import MedusaDrafter

        return MedusaDrafter.for_base(model, num_draft_heads=num_draft_heads, seed=seed)
    raise ChimeraError(f"unknown drafter architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")


def resolve_drafter(spec: str | None, model, architecture: str = "chimera"):
    """'auto' (the shipped drafter when one exists, else none), 'none', 'random', or a drafter directory."""
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        path = shipped_drafter_path(model, architecture)
        return load_any(path, model) if path is not None else None
    if spec == "random":
        return new_drafter(architecture, model).eval().requires_grad_(False)
    return load_any(spec, model)


def load_any(path, model, dtype=None):
    """Load a saved drafter of any kind by the architecture its config.json names."""
    from . import persist

    if persist.read_config(path).get("architecture", "chimera") == "medusa":  # read_config checked the name
        from .medusa import load_medusa

        return load_medusa(path, model, dtype=dtype)
    from .chimera import load_drafter

    return load_drafter(path, model, dtype=dtype)


def pack_for_cpu(drafter) -> bool:
    """Run a drafter's linear layers, and the frozen base head it projects onto the vocabulary with (ours keep
    it in ``_frozen``), through prepacked oneDNN products (cpu_linear) as the base's are: in place, and only
    for float32 on a CPU. Training it afterwards still works: packed layers fall back to ``F.linear`` for
    gradients. Returns whether it packed."""
    from ..cpu_linear import PackedLinear, available, pack_linears

    weight = next(drafter.parameters(), None) if isinstance(drafter, torch.nn.Module) else None
    if weight is None or not available(weight.device, weight.dtype):
        return False
    pack_linears(drafter)
    frozen = getattr(drafter, "_frozen", {})
    if type(frozen.get("lm_head")) is torch.nn.Linear:
        frozen["lm_head"] = PackedLinear(frozen["lm_head"])  # a wrapper: the base's own head is left as it is
    return True


def apply_draft_vocabulary(drafter, spec, device, route: str | None = None) -> int | None:
    """Set the drafter's draft vocabulary from ``spec`` ('auto', 'full' or a token count); returns its size,
    None for the full vocabulary. 'auto' restricts only where it pays (AUTO_DRAFT_VOCAB) and only drafters
    that know their base's token counts. ``route``: the projection's (the base head's calibrated route)."""
    supported = drafter is not None and hasattr(drafter, "use_draft_vocabulary")
    if spec in (None, "full"):
        size = None
    elif spec == "auto":
        known = supported and getattr(drafter, "token_counts", None) is not None
        size = AUTO_DRAFT_VOCAB.get(device.type) if known else None
    else:
        try:
            size = int(spec)
        except (TypeError, ValueError):
            size = 0
        if size <= 0:
            raise ChimeraError(f"draft vocabulary must be auto, full or a positive token count, got {spec!r}")
        if not supported:
            raise ChimeraError("a draft vocabulary needs a Chimera drafter: this one scores the whole vocabulary")
    if supported:
        drafter.use_draft_vocabulary(size, route)
    return size
