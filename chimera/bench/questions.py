"""Spec-Bench questions: reading, validating and selecting them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ChimeraError
from ..inputs import jsonl_rows

# Spec-Bench's six task categories; its MT-bench questions carry these eight finer categories.
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]

    @property
    def group(self) -> str:
        return group_of(self.category)


def group_of(category: str) -> str:
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


class QuestionLine(BaseModel):
    """One line of a Spec-Bench question file (more keys, such as a reference answer, are ignored)."""

    model_config = ConfigDict(extra="allow", strict=True)
    question_id: int | str
    category: Annotated[str, Field(min_length=1)]
    turns: Annotated[list[Annotated[str, Field(pattern=r"\S")]], Field(min_length=1)]


def load_questions(path) -> list[Question]:
    questions, seen = [], set()
    for number, row in jsonl_rows(path, QuestionLine, "question file"):
        if isinstance(row, ChimeraError):
            raise row
        if row.question_id in seen:
            raise ChimeraError(f"question file {path}:{number}: duplicate question_id {row.question_id!r}")
        seen.add(row.question_id)
        questions.append(Question(row.question_id, row.category, tuple(row.turns)))
    if not questions:
        raise ChimeraError(f"question file {path} has no questions")
    return questions


def select(questions: list[Question], categories=None, limit: int | None = None) -> list[Question]:
    """Keep the named groups or categories (all when None), at most ``limit`` questions from each."""
    known = {q.group for q in questions} | {q.category for q in questions}
    wanted = set(categories or ())
    unknown = sorted(wanted - known)
    if unknown:
        raise ChimeraError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}: "
                           f"this file has {', '.join(sorted(known))}")
    by_group: dict[str, list[Question]] = {}
    for q in questions:
        if not wanted or q.group in wanted or q.category in wanted:
            by_group.setdefault(q.group, []).append(q)
    keep = set()
    for qs in by_group.values():
        keep.update(id(q) for q in (_round_robin(qs)[:limit] if limit is not None else qs))
    return [q for q in questions if id(q) in keep]


def _round_robin(questions: list[Question]) -> list[Question]:
    """Alternate between categories (file order within each), so that a limited MT-bench subset covers
    writing, roleplay, reasoning, ... rather than only its first category."""
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    columns = list(by_category.values())
    return [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]
