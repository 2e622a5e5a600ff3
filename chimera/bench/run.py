"""The benchmark loop: questions × methods, interleaved per question, appended to one JSONL per method.

Resume: ``bench_config.json`` records the settings; a later run with the same settings skips what every
file already holds, and one with other settings is refused rather than mixed into the same tables.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ChimeraError
from ..inputs import owned, parse_json, read_bytes
from ..text import encode_prompt
from .methods import Turn
from .questions import Question
from .report import read_answers

CONFIG_FILE = "bench_config.json"


@dataclass
class BenchConfig:
    questions: str
    questions_sha256: str
    categories: list[str] | None
    limit: int | None
    max_new_tokens: int
    methods: list[str]
    model: str
    dtype: str
    device: str
    drafters: dict = field(default_factory=dict)  # method -> drafter path and tree
    warmup: int = 2
    temperature: float = 0.0  # 0: greedy; above: sampled (no top-k/top-p), each turn seeded from ``seed``
    seed: int = 0
    compile: str = "auto"  # our loop's base forward through torch.compile: auto, on or off (cli.COMPILE_CHOICES)


def prepare_out_dir(out: Path, config: BenchConfig) -> bool:
    """Create ``out`` or check that it holds this configuration's results; True when resuming."""
    path = out / CONFIG_FILE
    if path.is_file():
        try:
            saved = parse_json(read_bytes(path, "benchmark settings"), f"benchmark settings {path}")
        except ChimeraError as exc:
            raise ChimeraError(f"{exc}: use another --out directory") from None
        if not isinstance(saved, dict):
            raise ChimeraError(f"benchmark settings {path} is not a JSON object: use another --out directory")
        mine = asdict(config)
        changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if changed:
            raise ChimeraError(f"{out} holds results of another benchmark configuration (differs in "
                               f"{', '.join(changed)}): use another --out directory")
        return True
    if out.exists() and any(out.glob("*.jsonl")):
        raise ChimeraError(f"{out} holds result files but no {CONFIG_FILE}: use another --out directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise ChimeraError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return False


def done_questions(file: Path) -> set:
    """Question ids already answered in a method's file. The bench owns its --out directory (it runs under the
    directory's lock), so it alone cuts off a torn last line (a kill mid-write) before appending."""
    if not file.is_file():
        return set()
    data = read_bytes(file, "answer file")
    done = {row["question_id"] for row in read_answers(file)}
    keep = len(data[: data.rfind(b"\n") + 1])
    if keep != len(data):
        with open(file, "r+b") as f:
            f.truncate(keep)
    return done


def append_line(file: Path, record: dict) -> None:
    with open(file, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def turn_seed(seed: int, question_id, turn: int) -> int:
    """A seed per (run seed, question, turn): a resumed run samples each turn exactly as an unbroken one."""
    return zlib.crc32(f"{seed}:{question_id}:{turn}".encode())


def answer_question(method, tokenizer, question: Question, max_new_tokens: int, seed: int = 0
                    ) -> list[tuple[str, Turn]]:
    """All turns of one question; later turns see the method's own earlier answers (Spec-Bench)."""
    messages, turns = [], []
    for index, text in enumerate(question.turns):
        messages.append({"role": "user", "content": text})
        turn = method(encode_prompt(tokenizer, messages), max_new_tokens, turn_seed(seed, question.question_id, index))
        answer = tokenizer.decode(turn.token_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        turns.append((answer, turn))
    return turns


def warm_up(methods: dict, tokenizer, rounds: int, max_new_tokens: int, prompt_tokens: int = 0) -> None:
    """Run each method a few times untimed: first calls pay for kernel selection, allocator growth, caches (and
    hf-compiled for its static cache and compilation, sized for the longest first turn, ``prompt_tokens``; our
    loop, on a GPU, for the captures of every cache size and prompt length bucket, up to room for two more answers
    and a question beyond it, as later turns read the earlier ones)."""
    from .methods import OurDecoder, warm_up_static

    if "hf-compiled" in methods:
        warm_up_static(methods["hf-compiled"], max_new_tokens, prompt_tokens)
    for method in methods.values():
        if isinstance(method, OurDecoder):
            method.decoder.warm_up(prompt_tokens + 2 * max_new_tokens + 256, max_new_tokens)
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "Tell me about the history of tea."}])
    for _ in range(rounds):
        for method in methods.values():
            method(prompt, 32)


def spec_bench_record(question: Question, model_id: str, turns: list[tuple[str, Turn]]) -> dict:
    """One line of Spec-Bench's answer format, plus the token ids (for the exact-match check)."""
    return {
        "question_id": question.question_id,
        "category": question.category,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [{
            "index": 0,
            "turns": [answer for answer, _ in turns],
            "decoding_steps": [t.steps for _, t in turns],
            "new_tokens": [len(t.token_ids) for _, t in turns],
            "wall_time": [round(t.seconds, 6) for _, t in turns],
            "accept_lengths": [t.accept_lengths for _, t in turns],
            "token_ids": [t.token_ids for _, t in turns],
        }],
        "tstamp": time.time(),
    }


def run_bench(methods: dict, tokenizer, questions: list[Question], out: Path, config: BenchConfig,
              progress: bool = True) -> None:
    with owned(out, "bench"):
        _run_bench(methods, tokenizer, questions, out, config, progress)


def _run_bench(methods: dict, tokenizer, questions: list[Question], out: Path, config: BenchConfig,
               progress: bool) -> None:
    files = {name: out / f"{name}.jsonl" for name in methods}
    done = {name: done_questions(file) for name, file in files.items()}
    todo = [(q, name) for q in questions for name in methods if q.question_id not in done[name]]
    if not todo:
        return
    longest = max(len(encode_prompt(tokenizer, q.turns[0])) for q, _ in todo)
    warm_up(methods, tokenizer, config.warmup, config.max_new_tokens, longest)
    bar = tqdm(total=len(questions) * len(methods), initial=len(questions) * len(methods) - len(todo),
               desc="bench", disable=not progress)
    for question, name in todo:
        bar.set_postfix(method=name, category=question.category)
        turns = answer_question(methods[name], tokenizer, question, config.max_new_tokens, config.seed)
        append_line(files[name], spec_bench_record(question, f"{config.model}:{name}", turns))
        bar.update(1)
    bar.close()
