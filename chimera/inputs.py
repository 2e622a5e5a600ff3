"""One way in for everything chimera reads: files on disk and request bodies are decoded, parsed and validated
here before any other code sees them.

Why: a hostile-input sweep (175 cases) found each reader failing its own way on the same few classes of bad
input: bytes that are not UTF-8, JSON nested deep enough to exhaust Python's recursion, a field of the wrong
type (``"num_draft_heads": "8"``), a JSON array where an object belongs, a line torn by a kill. Here each
class is handled once:

- bytes → text: strict UTF-8, the error names the byte offset;
- text → JSON: no NaN/Infinity constants, at most ``MAX_DEPTH`` levels of nesting, no lone surrogates;
- JSON → typed value: a pydantic schema (a model or a dataclass, strictly: no "8" for 8), whose first error
  names the file (and line) and the field;
- files are opened read-only; JSONL readers ignore a last line with no newline (a write in progress or cut by
  a kill) and never repair it: that is for the command that owns the file, under its lock (``owned``).

Every failure is a ``ChimeraError`` of one line, which the CLI prints with exit status 2 and the server
answers with a 400.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import typing
from pathlib import Path
from typing import Any, Iterator, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, create_model

from .errors import ChimeraError

T = TypeVar("T")
MAX_DEPTH = 32  # nesting of arrays and objects; our files need 4, OpenAI request bodies about 6
MAX_FILE_BYTES = 256 << 20  # a JSON or JSONL file we read whole


def parse_json(data: bytes | str, where: str) -> Any:
    """``data`` as JSON, or a one-line error naming ``where``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ChimeraError(f"{where} is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ChimeraError(f"{where} is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:
        raise ChimeraError(f"{where} is not valid JSON: {exc}") from None
    _check_tree(value, where)
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _check_tree(value: Any, where: str) -> None:
    """Depth at most MAX_DEPTH and every string encodable (a ``\\ud800`` escape decodes to a lone surrogate)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, (list, dict)):
            if depth >= MAX_DEPTH:
                raise ChimeraError(f"{where} is nested more than {MAX_DEPTH} levels deep")
            if isinstance(item, dict):
                stack.extend((key, depth + 1) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChimeraError(f"{where} contains an invalid unicode escape (a lone surrogate)") from None


def field_path(error: dict) -> str:
    """The location of a pydantic error as ``a.b.0``, without the union member names pydantic adds."""
    return ".".join(str(part) for part in error["loc"] if not _is_union_tag(part))


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part
                                      or part.startswith("function-") or part[:1].isupper())


_ADAPTERS: dict = {}


def _adapter(schema) -> TypeAdapter:
    """A strict validator for ``schema``. A plain dataclass is validated through a model of its fields
    (pydantic's strict mode would want an instance of the dataclass itself), then built from them."""
    if schema not in _ADAPTERS:
        if dataclasses.is_dataclass(schema):
            hints = typing.get_type_hints(schema)
            fields = {f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING
                               else Field(default_factory=f.default_factory)
                               if f.default_factory is not dataclasses.MISSING else ...)
                      for f in dataclasses.fields(schema)}
            model = create_model(schema.__name__, __config__=ConfigDict(strict=True, extra="ignore"), **fields)
            _ADAPTERS[schema] = TypeAdapter(model)
        else:
            _ADAPTERS[schema] = TypeAdapter(schema)
    return _ADAPTERS[schema]


def validated(schema: type[T], value: Any, where: str) -> T:
    """``value`` as ``schema`` (a pydantic model or a dataclass, whose unknown keys are ignored), strictly;
    the first error in one line."""
    try:
        result = _adapter(schema).validate_python(value, strict=True)
        return schema(**dict(result)) if dataclasses.is_dataclass(schema) else result
    except ValueError as exc:  # a dataclass's own checks (__post_init__)
        if not isinstance(exc, ValidationError):
            raise ChimeraError(f"{where}: {exc}") from None
        error = exc.errors()[0]
        name = field_path(error)
        if error["type"] == "missing":
            raise ChimeraError(f"{where}: missing field {name!r}") from None
        if error["type"] == "extra_forbidden":
            raise ChimeraError(f"{where}: unknown field {name!r}") from None
        if not name and error["type"] in ("model_type", "model_attributes_type", "dict_type", "dataclass_type"):
            raise ChimeraError(f"{where}: expected a JSON object, got {_json_kind(value)}") from None
        raise ChimeraError(f"{where}: {f'field {name!r}: ' if name else ''}{error['msg']}") from None


def _json_kind(value) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def read_bytes(path, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """A whole file, read-only, with one-line errors for a missing, unreadable or oversized one."""
    path = Path(path)
    if not path.exists():
        raise ChimeraError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ChimeraError(f"{what} {path} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ChimeraError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ChimeraError(f"{what} {path} is larger than {limit >> 20} MiB")
    return data


def read_json(path, schema: type[T], what: str) -> T:
    """A JSON file as ``schema``."""
    return validated(schema, parse_json(read_bytes(path, what), f"{what} {path}"), f"{what} {path}")


def complete_lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` that end in a newline: in a file we append to, a last line without one is a write
    in progress or one cut short, which a reader leaves alone."""
    return data[: data.rfind(b"\n") + 1].splitlines()


def jsonl_rows(path, schema: type[T], what: str, data: bytes | None = None, appended: bool = False
               ) -> Iterator[tuple[int, T | ChimeraError]]:
    """(line number, row or the error that line raised) for each non-blank line of a JSONL file; in a file we
    append to (``appended``) only for complete lines."""
    data = read_bytes(path, what) if data is None else data
    for number, line in enumerate(complete_lines(data) if appended else data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{what} {path}:{number}"
        try:
            yield number, validated(schema, parse_json(line, where), where)
        except ChimeraError as exc:
            yield number, exc


def read_jsonl(path, schema: type[T], what: str, data: bytes | None = None, appended: bool = False) -> list[T]:
    """Every line of a JSONL file as ``schema`` (see ``jsonl_rows``); the first bad line is an error naming it."""
    rows = []
    for _, row in jsonl_rows(path, schema, what, data, appended):
        if isinstance(row, ChimeraError):
            raise row
        rows.append(row)
    return rows


@contextlib.contextmanager
def owned(directory, command: str):
    """Hold ``directory``'s lock while ``command`` writes (or repairs) its files: a second writer is refused
    with one line instead of interleaving its writes. Readers take no lock and write nothing."""
    path = Path(directory) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ChimeraError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ChimeraError(f"{directory} is in use by another chimera {command}: wait for it to finish, "
                               "or use another directory") from None
        yield
    finally:
        os.close(fd)
