"""Drafters propose draft trees; they all implement ``drafters.base.Drafter``."""

from __future__ import annotations

from pathlib import Path

from ..errors import ChimeraError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "drafters"
ARCHITECTURES = ("chimera", "medusa")


def shipped_drafter_path(model, architecture: str = "chimera") -> Path | None:
    """The drafter committed with chimera for this base, if any (matched by the base's alias)."""
    name = getattr(model.config, "chimera_source", None)
    if not name:
        return None
    suffix = "" if architecture == "chimera" else f"-{architecture}"
    path = SHIPPED_DIR / (Path(str(name)).name + suffix)
    return path if (path / "config.json").is_file() else None


def new_drafter(architecture: str, model, num_draft_heads: int = 6, seed: int | None = 0):
    """A freshly initialised drafter of the named kind, sized for ``model``."""
    if architecture == "chimera":
        from .chimera import ChimeraDrafter

        return ChimeraDrafter.for_base(model, num_draft_heads=num_draft_heads, seed=seed)
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

    arch = persist.read_config(path).get("architecture", "chimera")
    if arch == "chimera":
        from .chimera import load_drafter

        return load_drafter(path, model, dtype=dtype)
    if arch == "medusa":
        from .medusa import load_medusa

        return load_medusa(path, model, dtype=dtype)
    raise ChimeraError(f"drafter {path} has unknown architecture {arch!r}")
