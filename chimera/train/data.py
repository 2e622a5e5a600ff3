"""Distilled training data on disk: append-only, crash-safe, resumable.

A data directory holds
- ``meta.json``: the base model it was made with and the generation settings;
- ``tokens.bin`` (uint32) and ``mask.bin`` (uint8, 1 = assistant token), all samples back to back;
- ``index.jsonl``: one committed sample a line, ``{"id", "offset", "length"}``.

A sample is committed when its index line is written, after its tokens. Bytes past the last committed sample
(a write cut short by a kill) are ignored by readers (``chimera train``) and truncated only by the
``chimera distill`` that owns the directory, under its lock, so a resumed run neither loses nor duplicates and a
reader never changes the data, even while a distill is writing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ChimeraError
from ..inputs import jsonl_rows, owned, parse_json, read_bytes, validated

FORMAT_VERSION = 1


@dataclass
class Prompt:
    id: str
    text: str


class PromptLine(BaseModel):
    """One line of a prompts file: a non-empty ``prompt``, an optional ``id`` (default: the line number)."""

    model_config = ConfigDict(extra="allow", strict=True)
    prompt: Annotated[str, Field(pattern=r"\S")]
    id: str | int | None = None


def read_prompts(path) -> tuple[list[Prompt], int]:
    """Prompts from a JSONL file with a ``prompt`` field (``id`` optional). Returns (prompts, skipped lines):
    malformed lines and repeated ids are skipped and counted."""
    prompts, skipped, seen = [], 0, set()
    for number, row in jsonl_rows(path, PromptLine, "prompt file"):
        pid = None if isinstance(row, ChimeraError) else str(number if row.id is None else row.id)
        if pid is None or pid in seen:
            skipped += 1
            continue
        seen.add(pid)
        prompts.append(Prompt(pid, row.prompt))
    if not prompts:
        what = "has no valid lines" if skipped else "is empty"
        raise ChimeraError(f"prompt file {path} {what}: expected JSONL lines like {{\"prompt\": \"...\"}}")
    return prompts, skipped


class DistillMeta(BaseModel):
    """meta.json: what the data was made with (more keys are kept, unchecked)."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: Literal[1] = FORMAT_VERSION
    base: dict = {}
    max_new_tokens: int | None = None
    temperature: float | int | None = None
    prompts_sha256: str | None = None


class IndexEntry(BaseModel):
    """One committed sample of index.jsonl."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    offset: Annotated[int, Field(ge=0)]
    length: Annotated[int, Field(ge=0, le=1 << 24)]


class DistillStore:
    """Reader (``meta`` None: opens nothing for writing, changes nothing) or appender (``meta`` given: the
    ``chimera distill`` that owns the directory, under its lock, which alone repairs a write cut short)."""

    def __init__(self, directory, meta: dict | None = None):
        """Open ``directory``; with ``meta`` create it or check that it was made with the same settings."""
        self.dir = Path(directory)
        self._lock = None
        meta_path = self.dir / "meta.json"
        if meta is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ChimeraError(f"cannot write to {self.dir}: {exc.strerror or exc}") from None
            self._lock = owned(self.dir, "distill")
            self._lock.__enter__()
            try:
                if meta_path.is_file():
                    self.meta = self._read_meta(meta_path)
                    _check_same(self.meta, meta, self.dir)
                else:
                    self.meta = {"format": FORMAT_VERSION, **meta}
                    _atomic_write(meta_path, json.dumps(self.meta, indent=2) + "\n")
                self.index = self._read_index(repair=True)
            except BaseException:
                self.close()
                raise
        else:
            if not meta_path.is_file():
                raise ChimeraError(f"{self.dir} is not a chimera data directory (no meta.json)")
            self.meta = self._read_meta(meta_path)
            self.index = self._read_index(repair=False)

    def close(self) -> None:
        """Release the writer's lock (a reader holds none)."""
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    @staticmethod
    def _read_meta(path: Path) -> dict:
        raw = parse_json(read_bytes(path, "data file"), f"data file {path}")
        validated(DistillMeta, raw, f"data file {path}")
        return raw

    def _read_index(self, repair: bool) -> list[dict]:
        """The committed samples. A last index line without a newline, and data bytes past the last committed
        sample, are a write cut short: a reader ignores them; the owner (``repair``) truncates them, so that a
        resumed run neither loses nor duplicates. Anything else out of place is damage, and an error."""
        index_path = self.dir / "index.jsonl"
        raw = read_bytes(index_path, "data file") if index_path.is_file() else b""
        entries, end = [], 0
        for number, row in jsonl_rows(index_path, IndexEntry, "data file", raw, appended=True):
            if isinstance(row, ChimeraError):
                raise ChimeraError(f"{row}: the data directory is damaged")
            if row.offset != end:
                raise ChimeraError(f"data file {index_path}:{number}: offset {row.offset} does not follow the "
                                   f"previous sample (which ends at {end}): the data directory is damaged")
            entries.append(row.model_dump())
            end += row.length
        committed = len(raw[: raw.rfind(b"\n") + 1])
        if repair and committed != len(raw):
            with index_path.open("r+b") as f:
                f.truncate(committed)
        for name, width in (("tokens.bin", 4), ("mask.bin", 1)):
            path = self.dir / name
            size = path.stat().st_size if path.exists() else 0
            if size < end * width:
                raise ChimeraError(f"{path} is shorter than its index says: the data directory is damaged")
            if repair and size > end * width:
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

    def load(self, vocab_size: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """The committed samples as (tokens, assistant mask); token ids are checked against ``vocab_size``."""
        end = self.index[-1]["offset"] + self.index[-1]["length"] if self.index else 0
        if end == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, bool)) for _ in self.index]
        tokens = np.fromfile(self.dir / "tokens.bin", dtype=np.uint32, count=end)
        mask = np.fromfile(self.dir / "mask.bin", dtype=np.uint8, count=end)
        if vocab_size is not None and end and int(tokens.max()) >= vocab_size:
            raise ChimeraError(f"{self.dir / 'tokens.bin'} holds token id {int(tokens.max())}, past the base's "
                               f"vocabulary of {vocab_size}: the data directory is damaged")
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
