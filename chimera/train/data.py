"""Distilled training data on disk: append-only, crash-safe, resumable.

A data directory holds
- ``meta.json``: the base model it was made with and the generation settings;
- ``tokens.bin`` (uint32) and ``mask.bin`` (uint8, 1 = assistant token), all samples back to back;
- ``index.jsonl``: one committed sample a line, ``{"id", "offset", "length"}``.

A sample is committed when its index line is written, after its tokens. On opening, bytes past the last
committed sample (a write cut short by a kill) are truncated, so a resumed run neither loses nor duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ChimeraError

FORMAT_VERSION = 1


@dataclass
class Prompt:
    id: str
    text: str


def read_prompts(path) -> tuple[list[Prompt], int]:
    """Prompts from a JSONL file with a ``prompt`` field (``id`` optional). Returns (prompts, skipped lines)."""
    path = Path(path)
    if not path.is_file():
        raise ChimeraError(f"prompt file {path} does not exist")
    prompts, skipped, seen = [], 0, set()
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["prompt"]
                if not isinstance(text, str) or not text.strip():
                    raise ValueError
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                skipped += 1
                continue
            pid = str(row.get("id", number))
            if pid in seen:
                skipped += 1
                continue
            seen.add(pid)
            prompts.append(Prompt(pid, text))
    if not prompts:
        what = "has no valid lines" if skipped else "is empty"
        raise ChimeraError(f"prompt file {path} {what}: expected JSONL lines like {{\"prompt\": \"...\"}}")
    return prompts, skipped


class DistillStore:
    """Reader and appender for one data directory."""

    def __init__(self, directory, meta: dict | None = None):
        """Open ``directory``; with ``meta`` create it or check that it was made with the same settings."""
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if meta is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                probe = self.dir / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as exc:
                raise ChimeraError(f"cannot write to {self.dir}: {exc.strerror or exc}") from None
            if meta_path.is_file():
                self.meta = self._read_meta(meta_path)
                _check_same(self.meta, meta, self.dir)
            else:
                self.meta = {"format": FORMAT_VERSION, **meta}
                _atomic_write(meta_path, json.dumps(self.meta, indent=2) + "\n")
        else:
            if not meta_path.is_file():
                raise ChimeraError(f"{self.dir} is not a chimera data directory (no meta.json)")
            self.meta = self._read_meta(meta_path)
        self.index = self._recover()

    @staticmethod
    def _read_meta(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ChimeraError(f"{path} is corrupt") from None

    def _recover(self) -> list[dict]:
        """Read committed samples; drop anything written after the last commit."""
        index_path = self.dir / "index.jsonl"
        entries, good_bytes = [], 0
        if index_path.is_file():
            raw = index_path.read_bytes()
            for line in raw.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break
                entries.append(entry)
                good_bytes += len(line)
            if good_bytes != len(raw):
                with index_path.open("r+b") as f:
                    f.truncate(good_bytes)
        end = entries[-1]["offset"] + entries[-1]["length"] if entries else 0
        for name, width in (("tokens.bin", 4), ("mask.bin", 1)):
            path = self.dir / name
            size = path.stat().st_size if path.exists() else 0
            if size < end * width:
                raise ChimeraError(f"{path} is shorter than its index says: the data directory is damaged")
            if path.exists() and size > end * width:
                with path.open("r+b") as f:
                    f.truncate(end * width)
        return entries

    @property
    def done_ids(self) -> set[str]:
        return {e["id"] for e in self.index}

    def __len__(self) -> int:
        return len(self.index)

    def append(self, sample_id: str, tokens, mask) -> None:
        tokens = np.asarray(tokens, dtype=np.uint32)
        mask = np.asarray(mask, dtype=np.uint8)
        assert tokens.shape == mask.shape
        offset = self.index[-1]["offset"] + self.index[-1]["length"] if self.index else 0
        for name, array in (("tokens.bin", tokens), ("mask.bin", mask)):
            with (self.dir / name).open("ab") as f:
                f.write(array.tobytes())
                f.flush()
                os.fsync(f.fileno())
        entry = {"id": sample_id, "offset": offset, "length": int(tokens.size)}
        with (self.dir / "index.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.index.append(entry)

    def load(self) -> list[tuple[np.ndarray, np.ndarray]]:
        tokens = np.fromfile(self.dir / "tokens.bin", dtype=np.uint32) if self.index else np.zeros(0, np.uint32)
        mask = np.fromfile(self.dir / "mask.bin", dtype=np.uint8) if self.index else np.zeros(0, np.uint8)
        return [(tokens[e["offset"]: e["offset"] + e["length"]].astype(np.int64),
                 mask[e["offset"]: e["offset"] + e["length"]].astype(bool)) for e in self.index]


def _check_same(existing: dict, wanted: dict, directory: Path) -> None:
    from ..identity import describe, same_base

    base_old, base_new = existing.get("base", {}), wanted.get("base", {})
    if not same_base(base_old, base_new):
        raise ChimeraError(f"{directory} holds data made with base {describe(base_old)}, not "
                           f"{describe(base_new)}: use another --out directory")
    for key in ("max_new_tokens", "temperature", "prompts_sha256"):
        if existing.get(key) != wanted.get(key):
            raise ChimeraError(f"{directory} was made with {key}={existing.get(key)!r}, not {wanted.get(key)!r}: "
                               "use the same settings to resume, or another --out directory")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def count_tokens(samples, vocab_size: int) -> np.ndarray:
    """How often each token id is an assistant token of ``samples`` ((tokens, mask) pairs): what the base
    writes, which ranks the vocabulary for a drafter's frequent-token draft vocabulary."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens, mask in samples:
        counts += np.bincount(tokens[mask.astype(bool)], minlength=vocab_size)[:vocab_size]
    return counts
