"""`chimera bench` on a tiny model: every file, numbers that agree with each other, resume, bad input."""

import json
import re

import pytest

from chimera.batch import DRAFT_DEPTH
from chimera.bench.methods import emitted_per_forward
from chimera.bench.questions import load_questions, select
from chimera.cli import main

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short poem about rain.", "Now make it rhyme."]},
    {"question_id": 101, "category": "coding", "turns": ["Write a function that adds two numbers."]},
    {"question_id": 200, "category": "translation", "turns": ["Translate to French: good night."]},
    {"question_id": 300, "category": "qa", "turns": ["Who wrote Hamlet?"]},
]
METHODS = ["hf", "hf-pld", "ar", "chimera", "medusa"]


def write_questions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench_args(questions, out, model_dir, *extra):
    return ["bench", "--questions", str(questions), "--out", str(out), "--model", str(model_dir), "--device", "cpu",
            "--chimera-drafter", "random", "--medusa-drafter", "random", "--tree", "small", "--max-new-tokens", "10",
            "--warmup", "1", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("bench")
    questions = write_questions(tmp / "q.jsonl", QUESTIONS)
    out = tmp / "out"
    assert main(bench_args(questions, out, tiny_model_dir, "--limit", "1")) == 0
    return questions, out


def test_a_tiny_run_writes_consistent_files(finished_run):
    _, out = finished_run
    for name in [f"{m}.jsonl" for m in METHODS] + ["summary.json", "report.md", "report.png", "bench_config.json"]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    table = summary["categories"]
    assert set(table) == {"mt_bench", "translation", "qa", "overall"}  # --limit 1: one MT question
    for method in METHODS:
        rows = [json.loads(line) for line in (out / f"{method}.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [81, 200, 300]
        for r in rows:
            c = r["choices"][0]
            assert len(c["turns"]) == len(c["new_tokens"]) == len(c["wall_time"]) == len(c["token_ids"])
            for steps, tokens, accepted, ids in zip(c["decoding_steps"], c["new_tokens"], c["accept_lengths"],
                                                    c["token_ids"]):
                assert tokens == len(ids) and sum(accepted) == tokens and len(accepted) == steps
        speeds = [sum(r["choices"][0]["new_tokens"]) / sum(r["choices"][0]["wall_time"]) for r in rows]
        s = table["overall"][method]
        assert s["tokens_per_s"] == pytest.approx(sum(speeds) / len(speeds))
        assert s["tau"] * s["steps"] == pytest.approx(s["new_tokens"])
        assert s["step_seconds"] * s["steps"] == pytest.approx(s["seconds"], rel=1e-3, abs=1e-4)  # 4 decimals
        assert s["speedup"] == pytest.approx(s["tokens_per_s"] / table["overall"]["hf"]["tokens_per_s"])
        assert s["r"] == pytest.approx(s["step_seconds"] / table["overall"]["ar"]["step_seconds"])
        if method != "hf":
            expected = 1.0 if method != "hf-pld" else s["exact_match"]  # float32: our methods are exact
            assert s["exact_match"] == expected
    assert table["overall"]["hf"]["tau"] == table["overall"]["ar"]["tau"] == 1.0
    report = (out / "report.md").read_text()
    assert "CPU:" in report and "transformers" in report and "| chimera |" in report and "## overall" in report
    assert re.search(r"Our loop \(`ar`, `chimera`, `medusa`\): eager forwards with (oneDNN-prepacked|stock) linear "
                     r"layers(, vocabulary projection by (linear|few_rows|packed))?, KV cache grown in place", report)


def test_rerun_resumes_and_a_torn_file_is_completed(finished_run, tiny_model_dir, capsys):
    questions, out = finished_run
    before = {m: (out / f"{m}.jsonl").read_text() for m in METHODS}
    assert main(bench_args(questions, out, tiny_model_dir, "--limit", "1")) == 0
    assert "resuming" in capsys.readouterr().out
    assert {m: (out / f"{m}.jsonl").read_text() for m in METHODS} == before  # nothing was run again
    lines = before["chimera"].splitlines(keepends=True)
    (out / "chimera.jsonl").write_text(lines[0] + lines[1][:40])  # killed while writing the second line
    assert main(bench_args(questions, out, tiny_model_dir, "--limit", "1")) == 0
    rows = [json.loads(line) for line in (out / "chimera.jsonl").read_text().splitlines()]
    assert sorted(r["question_id"] for r in rows) == [81, 200, 300]


def test_other_configuration_in_the_output_directory_is_refused(finished_run, tiny_model_dir, capsys):
    questions, out = finished_run
    assert main(bench_args(questions, out, tiny_model_dir, "--limit", "1", "--max-new-tokens", "11")) == 2
    err = capsys.readouterr().err.strip()
    assert "another benchmark configuration" in err and "max_new_tokens" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("rows, message", [
    ([{"question_id": 1, "turns": ["hi"]}], "missing field 'category'"),
    ([{"question_id": 1, "category": "qa", "turns": []}], "field 'turns': List should have at least 1 item"),
    ([{"question_id": 1, "category": "qa", "turns": ["a"]}, {"question_id": 1, "category": "qa", "turns": ["b"]}],
     "duplicate question_id"),
])
def test_bad_question_files(tmp_path, rows, message, capsys):
    questions = write_questions(tmp_path / "q.jsonl", rows)
    assert main(["bench", "--questions", str(questions), "--out", str(tmp_path / "o"), "--methods", "hf"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_method_or_category(tmp_path, capsys):
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    assert main(["bench", "--questions", str(questions), "--out", str(tmp_path / "o"), "--methods", "hf", "eagle"]) == 2
    assert "unknown method eagle" in capsys.readouterr().err
    assert main(["bench", "--questions", str(questions), "--out", str(tmp_path / "o"), "--categories", "poetry"]) == 2
    assert "unknown category poetry" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_limited_mt_bench_covers_its_categories(tmp_path):
    rows = [{"question_id": i, "category": c, "turns": ["x"]}
            for i, c in enumerate(["writing"] * 3 + ["coding"] * 3 + ["qa"] * 3)]
    chosen = select(load_questions(write_questions(tmp_path / "q.jsonl", rows)), ["mt_bench"], limit=2)
    assert [q.category for q in chosen] == ["writing", "coding"]


def test_emitted_per_forward_from_cache_lengths():
    # prompt of 12; forwards start at cache lengths 0, 12, 13, 16 and 12 + 6 - 1 is the last token's position
    assert emitted_per_forward([0, 12, 13, 16], 12, 6) == [1, 1, 3, 1]
    assert emitted_per_forward([None, None], 12, 2) is None


def test_sampled_run_reports_speed_without_exactness_and_resumes_the_same(tmp_path, tiny_model_dir):
    """--temperature: every method samples, each turn from its own seed, so a resumed run draws what an
    unbroken one would; tokens differ from hf's by design, so no exact-match figure is claimed."""
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS[2:])
    out = tmp_path / "out"
    args = bench_args(questions, out, tiny_model_dir, "--methods", "hf", "ar", "chimera", "--temperature", "1",
                      "--seed", "3")
    assert main(args) == 0
    table = json.loads((out / "summary.json").read_text())["categories"]
    for method in ("ar", "chimera"):
        s = table["overall"][method]
        assert "exact_match" not in s
        assert s["tau"] * s["steps"] == pytest.approx(s["new_tokens"])
        assert s["speedup"] == pytest.approx(s["tokens_per_s"] / table["overall"]["hf"]["tokens_per_s"])
    assert table["overall"]["ar"]["tau"] == 1.0
    report = (out / "report.md").read_text()
    assert "sampled at temperature 1 (seed 3" in report and "n/a (sampled)" in report
    first = [json.loads(line) for line in (out / "chimera.jsonl").read_text().splitlines()]
    (out / "chimera.jsonl").write_text(json.dumps(first[0]) + "\n")  # as if killed after one question
    assert main(args) == 0
    again = [json.loads(line) for line in (out / "chimera.jsonl").read_text().splitlines()]
    assert [r["choices"][0]["token_ids"] for r in again] == [r["choices"][0]["token_ids"] for r in first]
    assert main(bench_args(questions, out, tiny_model_dir, "--methods", "hf", "ar", "chimera")) == 2  # greedy: refused


def test_the_static_cache_baseline_and_the_identity_columns(tmp_path, tiny_model_dir):
    """hf-compiled (generate with a static cache; compiled by transformers on a GPU only) decodes what hf does,
    and the report gains a speedup over it and the share identical to our own plain loop."""
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    assert main(bench_args(questions, out, tiny_model_dir, "--limit", "1", "--methods", "hf", "hf-compiled", "ar",
                           "chimera")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["dtype"] == "float32"  # auto on a CPU
    overall = summary["categories"]["overall"]
    assert overall["hf-compiled"]["exact_match"] == 1.0 and overall["chimera"]["identical_to_ar"] == 1.0
    for method, s in overall.items():
        assert s["speedup_compiled"] == pytest.approx(s["tokens_per_s"] / overall["hf-compiled"]["tokens_per_s"])
    assert "identical_to_ar" not in overall["ar"] and "identical_to_ar" not in overall["hf"]
    report = (out / "report.md").read_text()
    assert "| method | tokens/s | speedup vs hf | vs hf-compiled | tau | r | exact vs hf | identical to ar |" in report


def test_throughput_replays_every_question_at_every_concurrency(tmp_path, tiny_model_dir, capsys):
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS * 1)
    out = tmp_path / "throughput"
    assert main(["throughput", "--questions", str(questions), "--out", str(out), "--model", str(tiny_model_dir),
                 "--device", "cpu", "--drafter", "random", "--concurrency", "1", "3", "--max-new-tokens", "12",
                 "--methods", "ar", "chimera", "hf", "hf-compiled"]) == 0
    rows = json.loads((out / "throughput.json").read_text())
    assert [(r["method"], r["concurrency"]) for r in rows] == [
        (m, c) for c in (1, 3) for m in ("ar", "chimera", "hf", "hf-compiled")]
    assert all(r["requests"] == len(QUESTIONS) and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["latency_p50_s"] <= r["latency_p99_s"] for r in rows)
    # the same greedy answers whichever way our engine decoded them: the same number of tokens (generate's batches
    # are left-padded, which may round otherwise; hf-compiled's last batch is filled up, its extra answers dropped)
    assert len({r["tokens"] for r in rows if not r["method"].startswith("hf")}) == 1
    assert "| ar | 3 |" in capsys.readouterr().out and (out / "throughput.md").is_file()
    assert all(r["batch_drafted_share"] is None for r in rows)  # no drafting batch
    for r in rows:  # where the worker's time went: parts of the run's wall time, one join per request in the batch
        if r["method"].startswith("hf"):
            assert r["worker"] is None
            continue
        work = r["worker"]
        # within the run's wall time, but for the worker's cleanup after the last answer (a lone decoding's cache
        # freed once its client has the text)
        assert sum(part["seconds"] for part in work.values()) <= 1.1 * r["seconds"] + 0.1
        assert work["join"]["count"] + work["alone"]["count"] - work["out_of_batch"]["count"] == len(QUESTIONS)
        if r["concurrency"] == 1:  # one client: every request served alone, the server idle when it comes
            assert work["step"]["count"] == work["join"]["count"] == 0 and work["alone"]["count"] == len(QUESTIONS)
    assert "Where the engine's worker spent each run" in (out / "throughput.md").read_text()
    assert main(["throughput", "--questions", str(questions), "--out", str(tmp_path / "drafting"), "--model",
                 str(tiny_model_dir), "--device", "cpu", "--drafter", "random", "--concurrency", "3",
                 "--max-new-tokens", "12", "--methods", "chimera", "--batch-drafting"]) == 0
    drafting = json.loads((tmp_path / "drafting" / "throughput.json").read_text())[0]
    assert drafting["tokens"] == rows[0]["tokens"] and 0 <= drafting["batch_drafted_share"] <= 1
    assert drafting["batch_drafted_share"] == 0 or 1 <= drafting["batch_tau"] <= 1 + DRAFT_DEPTH
    steps = {int(depth): count for depth, count in drafting["batch_depths"].items()}
    assert set(steps) <= set(range(DRAFT_DEPTH + 1))
    assert sum(count for depth, count in steps.items() if depth) / sum(steps.values()) == pytest.approx(
        drafting["batch_drafted_share"], abs=1e-3)
    assert drafting["batch_depth_seconds"].keys() == drafting["batch_depths"].keys()
    assert sum(drafting["batch_depth_seconds"].values()) <= drafting["worker"]["step"]["seconds"]
    drafted_seconds = sum(s for depth, s in drafting["batch_depth_seconds"].items() if int(depth))
    assert 0 <= drafting["batch_catch_up_seconds"] <= drafted_seconds
    assert sum(steps.values()) == drafting["worker"]["step"]["count"]
    assert main(["throughput", "--questions", str(questions), "--out", str(out), "--model", str(tiny_model_dir),
                 "--methods", "ar", "beam"]) == 2
    assert "unknown method beam" in capsys.readouterr().err
