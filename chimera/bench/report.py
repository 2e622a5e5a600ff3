"""From the per-method JSONL files to summary.json, report.md and a plot.

Definitions (DESIGN.md): tau = new tokens / base forwards; r = time per base forward over that of plain
autoregressive decoding (our ``ar`` when it ran, else ``hf``), so speedup over it = tau / r. Speed is
Spec-Bench's: the mean over questions of each question's tokens / seconds, and speedup is the ratio of
those means against ``hf``.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ..inputs import read_jsonl
from .questions import GROUPS, group_of


class Choice(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    turns: list[str]
    decoding_steps: list[int]
    new_tokens: list[int]
    wall_time: list[float | int]
    accept_lengths: list[list[int] | None]
    token_ids: list[list[int]]


class AnswerLine(BaseModel):
    """One line of a method's answer file (run.spec_bench_record)."""

    model_config = ConfigDict(extra="allow", strict=True)
    question_id: int | str
    category: str
    choices: Annotated[list[Choice], Field(min_length=1)]


def read_answers(file: Path) -> list[dict]:
    """A method's answers, each line checked; a last line cut short by a kill is not read (run.py repairs it)."""
    return [row.model_dump() for row in read_jsonl(file, AnswerLine, "answer file", appended=True)]


def _stats(rows: list[dict], reference: dict | None) -> dict:
    tokens = sum(sum(r["choices"][0]["new_tokens"]) for r in rows)
    seconds = sum(sum(r["choices"][0]["wall_time"]) for r in rows)
    steps = sum(sum(r["choices"][0]["decoding_steps"]) for r in rows)
    speeds = [sum(r["choices"][0]["new_tokens"]) / max(sum(r["choices"][0]["wall_time"]), 1e-9) for r in rows]
    out = {"questions": len(rows), "new_tokens": tokens, "seconds": round(seconds, 4), "steps": steps,
           "tau": tokens / steps if steps else 0.0,
           "tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
           "step_seconds": seconds / steps if steps else 0.0}
    if reference is not None:
        out["exact_match"] = share_identical(rows, reference)
    return out


def share_identical(rows: list[dict], reference: dict) -> float | None:
    """The share of turns whose tokens equal those of ``reference`` (question id -> answer line)."""
    same = total = 0
    for r in rows:
        ref = reference.get(r["question_id"])
        if ref is None:
            continue
        for mine, theirs in zip(r["choices"][0]["token_ids"], ref["choices"][0]["token_ids"]):
            same += mine == theirs
            total += 1
    return same / total if total else None


def summarize(out: Path, methods: list[str], compare_tokens: bool = True) -> dict:
    """Per-category statistics. ``compare_tokens`` is off for sampled runs: their tokens differ by design
    (their distribution is what tests/test_sampling.py checks)."""
    answers = {m: read_answers(out / f"{m}.jsonl") for m in methods if (out / f"{m}.jsonl").is_file()}
    # only questions every method answered: an interrupted run must not compare different question sets
    common = set.intersection(*({r["question_id"] for r in rows} for rows in answers.values())) if answers else set()
    answers = {m: [r for r in rows if r["question_id"] in common] for m, rows in answers.items()}
    reference = {r["question_id"]: r for r in answers.get("hf", [])} if compare_tokens else None
    ours = {r["question_id"]: r for r in answers.get("ar", [])} if compare_tokens and "ar" in answers else None
    groups = [g for g in GROUPS if any(group_of(r["category"]) == g for rows in answers.values() for r in rows)]
    groups += sorted({group_of(r["category"]) for rows in answers.values() for r in rows} - set(groups))
    table: dict = {}
    for scope in groups + ["overall"]:
        table[scope] = {}
        for method, rows in answers.items():
            picked = [r for r in rows if scope == "overall" or group_of(r["category"]) == scope]
            if picked:
                table[scope][method] = _stats(picked, reference if method != "hf" else None)
                if ours is not None and method not in ("hf", "ar"):
                    table[scope][method]["identical_to_ar"] = share_identical(picked, ours)
        base = table[scope].get("hf")
        compiled = table[scope].get("hf-compiled")
        unit = table[scope].get("ar") or base
        for method, s in table[scope].items():
            s["speedup"] = s["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
            if compiled is not None:  # the strongest baseline: what one flag of transformers gives
                rate = compiled["tokens_per_s"]
                s["speedup_compiled"] = s["tokens_per_s"] / rate if rate else None
            s["r"] = s["step_seconds"] / unit["step_seconds"] if unit and unit["step_seconds"] else None
    return {"categories": table}


def environment(model, device) -> dict:
    import torch
    import transformers

    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("chimera-decoding")
    except PackageNotFoundError:
        ours = "source"
    if device.type == "cuda":
        machine = f"GPU: {torch.cuda.get_device_name(device)}"
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                   platform.processor() or platform.machine())
        machine = f"CPU: {cpu}, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)"
    return {"machine": machine, "device": str(device), "dtype": str(next(model.parameters()).dtype),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "chimera": ours,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def decoding_label(settings: dict) -> str:
    t = settings.get("temperature") or 0
    return f"sampled at temperature {t:g} (seed {settings.get('seed', 0)}, no top-k/top-p)" if t else "greedy"


def write_report(out: Path, summary: dict, settings: dict) -> None:
    table = summary["categories"]
    env = summary["environment"]
    lines = [f"# chimera bench: {settings['model']}", "",
             f"- Machine: {env['machine']} (device `{env['device']}`, {env['dtype']})",
             f"- Libraries: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"chimera {env['chimera']}; run {env['date']}",
             *([f"- Our loop (`ar`, `chimera`, `medusa`): {env['our_loop']}; `hf`, `hf-compiled` and `hf-pld` run "
                "transformers' `generate` as it comes"] if env.get("our_loop") else []),
             f"- Settings: {decoding_label(settings)}, batch size 1, up to {settings['max_new_tokens']} new tokens per turn, "
             f"{settings['warmup']} warm-up rounds, questions from `{settings['questions']}`"
             + (f", at most {settings['limit']} per category" if settings.get("limit") else ""),
             ]
    for method, info in settings.get("drafters", {}).items():
        lines.append(f"- `{method}`: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    compiled = any("hf-compiled" in methods for methods in table.values())
    with_ar = any("identical_to_ar" in s for methods in table.values() for s in methods.values())
    lines += ["", "tokens/s is the mean over questions of tokens / wall time (Spec-Bench); speedup is its ratio to "
              "`hf`" + (" and to `hf-compiled` (static cache, compiled by transformers on a GPU: the strongest "
                        "baseline, and the one that counts)" if compiled else "")
              + "; tau = tokens per base forward; r = time per base forward over plain decoding's (`ar`); "
              "exact = share of turns whose tokens equal `hf`'s"
              + ("; identical to `ar` = the same share against our own plain loop in the same dtype (in bfloat16 "
                 "a tree forward and a one-token forward may round differently)" if with_ar else "") + ".", ""]
    for scope, methods in table.items():
        if not methods:
            continue
        n = max(s["questions"] for s in methods.values())
        head = ["method", "tokens/s", "speedup vs hf"] + (["vs hf-compiled"] if compiled else []) + \
            ["tau", "r", "exact vs hf"] + (["identical to ar"] if with_ar else [])
        lines += [f"## {scope} ({n} questions)", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for method, s in methods.items():
            if method == "hf":
                exact = "reference"
            else:
                exact = "n/a (sampled)" if settings.get("temperature") else _fmt(s.get("exact_match"), "{:.0%}")
            cells = [method, f"{s['tokens_per_s']:.2f}", _fmt(s["speedup"], "{:.2f}x")]
            cells += [_fmt(s.get("speedup_compiled"), "{:.2f}x")] if compiled else []
            cells += [f"{s['tau']:.2f}", _fmt(s["r"], "{:.2f}"), exact]
            cells += [_fmt(s.get("identical_to_ar"), "{:.0%}") if method != "ar" else "reference"] if with_ar else []
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![speedup and tau per category](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out / "report.png", table, env["machine"])


def plot(path: Path, table: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = [s for s in table if table[s]]
    methods = [m for m in ("hf", "hf-pld", "ar", "chimera", "medusa") if any(m in table[s] for s in scopes)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(scopes))]
        for ax, key in zip(axes, ("speedup", "tau")):
            ax.bar(xs, [table[s].get(method, {}).get(key) or 0 for s in scopes], width, label=method)
    for ax, label in zip(axes, ("speedup over hf generate", "tau (tokens per base forward)")):
        ax.set_xticks(range(len(scopes)), scopes, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
