"""Drafters propose draft trees; they all implement ``drafters.base.Drafter``."""

from __future__ import annotations

from pathlib import Path

from ..errors import ChimeraError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "drafters"


def shipped_drafter_path(model) -> Path | None:
    """The drafter committed with chimera for this base, if any (matched by the base's alias)."""
    name = getattr(model.config, "chimera_source", None)
    if not name:
        return None
    path = SHIPPED_DIR / Path(str(name)).name
    return path if (path / "config.json").is_file() else None


def resolve_drafter(spec: str | None, model):
    """'auto' (the shipped drafter when one exists, else none), 'none', 'random', or a drafter directory."""
    from .chimera import ChimeraDrafter

    if spec is None or spec == "none":
        return None
    if spec == "auto":
        path = shipped_drafter_path(model)
        return load_any(path, model) if path is not None else None
    if spec == "random":
        return ChimeraDrafter.for_base(model).eval().requires_grad_(False)
    return load_any(spec, model)


def load_any(path, model):
    """Load a saved drafter of any kind by the architecture its config.json names."""
    import json

    from .chimera import load_drafter

    path = Path(path)
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            arch = json.loads(config.read_text()).get("architecture", "chimera")
        except (json.JSONDecodeError, AttributeError):
            raise ChimeraError(f"drafter config {config} is not valid JSON") from None
        if arch != "chimera":
            raise ChimeraError(f"drafter {path} has unknown architecture {arch!r}")
    return load_drafter(path, model)
