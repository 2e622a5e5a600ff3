"""Hostile input to everything we read (inputs.py): one clear line and exit status 2, never a traceback, never a
changed file. Property-based (hypothesis) for the readers, plus one test per class of case a sweep found."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chimera import ChimeraError
from chimera.bench.questions import load_questions
from chimera.bench.run import BenchConfig, done_questions, prepare_out_dir
from chimera.cli import main
from chimera.drafters import load_any
from chimera.identity import base_identity
from chimera.inputs import MAX_DEPTH, owned, parse_json
from chimera.server.schemas import APIError, ChatCompletionRequest, CompletionRequest, validate
from chimera.server.schemas import parse_json as parse_body
from chimera.train.data import DistillStore, read_prompts
from conftest import tiny_model
from test_drafter import perturbed_drafter

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)
hostile_bytes = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                          st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
                          st.sampled_from([b"\xff\xfe{}", b'{"a": NaN}', b'"\\ud800"', b"{", b"", b"\n\n"]))


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("chimera: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


# ------------------------------------------------------------------------------------- JSON in general


@SETTINGS
@given(hostile_bytes)
def test_parse_json_accepts_or_refuses_in_one_line(data):
    try:
        parse_json(data, "x")
    except ChimeraError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("x ")


def test_depth_limit():
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x") is not None
    for depth in (MAX_DEPTH + 1, 100_000):
        with pytest.raises(ChimeraError, match="nested more than"):
            parse_json("[" * depth + "]" * depth, "x")


# ------------------------------------------------------------------------------------- request bodies


@SETTINGS
@given(hostile_bytes)
def test_request_bodies_are_a_400_or_valid(body):
    try:
        data = parse_body(body)
        validate(ChatCompletionRequest, data)
    except APIError as exc:
        assert exc.status == 400 and "\n" not in exc.message


@SETTINGS
@given(st.dictionaries(st.sampled_from(["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
                                        "stop", "stream", "n", "echo", "logprobs", "suffix", "user"]), json_values))
def test_completion_fields_of_any_type_are_a_400_or_valid(fields):
    try:
        validate(CompletionRequest, fields)
    except APIError as exc:
        assert exc.status == 400 and "\n" not in exc.message


# ------------------------------------------------------------------------------------- drafter directories


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def saved_drafter(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("drafter") / "d"
    perturbed_drafter(model).save(path)
    return path


def with_config(saved: Path, tmp: Path, config: bytes) -> Path:
    target = tmp / "forged"
    target.mkdir(exist_ok=True)
    (target / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    (target / "config.json").write_bytes(config)
    return target


def forged_configs(saved: Path) -> dict:
    good = json.loads((saved / "config.json").read_text())
    return {"random bytes": os.urandom(300), "not utf-8": b'{"a": "\xff"}', "array": b"[]",
            "deep": b"[" * 100_000 + b"]" * 100_000,
            "heads a string": json.dumps({**good, "num_draft_heads": "8"}).encode(),
            "base a string": json.dumps({**good, "base": "smollm2"}).encode(),
            "architecture unknown": json.dumps({**good, "architecture": "eagle"}).encode(),
            "heads huge": json.dumps({**good, "num_draft_heads": 10**9}).encode(),
            "hidden huge": json.dumps({**good, "hidden_size": 10**9}).encode(),
            "width zero": json.dumps({**good, "intermediate_size": 0}).encode(),
            "missing field": json.dumps({k: v for k, v in good.items() if k != "head_dim"}).encode()}


def test_every_forged_drafter_config_is_one_line(model, saved_drafter, tmp_path):
    for name, config in forged_configs(saved_drafter).items():
        path = with_config(saved_drafter, tmp_path, config)
        with pytest.raises(ChimeraError) as info:
            load_any(path, model)
        assert "\n" not in str(info.value) and "config.json" in str(info.value), (name, str(info.value))


@SETTINGS
@given(hostile_bytes)
def test_drafter_config_of_any_bytes(model, saved_drafter, tmp_path, config):
    path = with_config(saved_drafter, tmp_path, config)
    with pytest.raises(ChimeraError):
        load_any(path, model)


def test_forged_configs_through_the_cli(capsys, saved_drafter, tmp_path):
    for name in ("random bytes", "heads a string", "base a string"):
        path = with_config(saved_drafter, tmp_path, forged_configs(saved_drafter)[name])
        assert_one_line_error(*run_cli(capsys, "generate", "hi", "--drafter", path, "--max-new-tokens", 2),
                              "config.json")


# ------------------------------------------------------------------------------------- distilled data


META = {"base": base_identity(tiny_model("llama")), "max_new_tokens": 4, "temperature": 0.0, "prompts_sha256": None}


def distilled(directory: Path, samples=((5, 6, 7), (8, 9))) -> Path:
    store = DistillStore(directory, META)
    for i, tokens in enumerate(samples):
        store.append(str(i), list(tokens), [0] + [1] * (len(tokens) - 1))
    store.close()
    return directory


def test_reading_never_writes_even_a_torn_directory(tmp_path):
    data = distilled(tmp_path / "data")
    with open(data / "tokens.bin", "ab") as f:  # a distill killed mid-write: tokens past the last commit
        f.write(b"\x01\x00\x00\x00\x02\x00")
    with open(data / "index.jsonl", "ab") as f:
        f.write(b'{"id": "2", "off')
    before = digest(data)
    samples = DistillStore(data).load()
    assert [s[0].tolist() for s in samples] == [[5, 6, 7], [8, 9]]
    assert digest(data) == before
    # the owner repairs what a kill left, under its lock
    DistillStore(data, META).close()
    assert (data / "tokens.bin").stat().st_size == 5 * 4 and (data / "index.jsonl").read_bytes().endswith(b"}\n")


def test_a_second_writer_is_refused(tmp_path):
    data = distilled(tmp_path / "data")
    first = DistillStore(data, META)
    try:
        with pytest.raises(ChimeraError, match="in use by another chimera distill"):
            DistillStore(data, META)
        DistillStore(data).load()  # a reader is never refused
    finally:
        first.close()
    with owned(data, "distill"):
        pass


@pytest.mark.parametrize("name,content", [("meta.json", b"\x8f\x00garbage"), ("meta.json", b"[]"),
                                          ("meta.json", b'{"format": 7}'), ("index.jsonl", b"{}\n"),
                                          ("index.jsonl", b'{"id": "0", "offset": 5, "length": 3}\n'),
                                          ("index.jsonl", b'{"id": "0", "offset": 0, "length": 99}\n'),
                                          ("index.jsonl", b"\xff\xff\n")])
def test_damaged_data_is_one_line_and_untouched(tmp_path, name, content):
    data = distilled(tmp_path / "data")
    (data / name).write_bytes(content)
    before = digest(data)
    with pytest.raises(ChimeraError) as info:
        DistillStore(data).load()
    assert "\n" not in str(info.value)
    assert digest(data) == before


def test_token_ids_past_the_vocabulary_are_refused(tmp_path):
    data = distilled(tmp_path / "data", samples=((5, 10**6),))
    with pytest.raises(ChimeraError, match="past the base's vocabulary"):
        DistillStore(data).load(vocab_size=128)


@SETTINGS
@given(meta=hostile_bytes, index=hostile_bytes)
def test_data_directory_of_any_bytes(tmp_path_factory, meta, index):
    data = tmp_path_factory.mktemp("data")
    (data / "meta.json").write_bytes(meta)
    (data / "index.jsonl").write_bytes(index)
    before = digest(data)
    try:
        DistillStore(data).load()
    except ChimeraError as exc:
        assert "\n" not in str(exc)
    assert digest(data) == before


# ------------------------------------------------------------------------------------- prompts and questions


def test_prompt_lines_that_are_not_prompts_are_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n' + b"[" * 100_000 + b"]" * 100_000 + b'\n\xff\xfe\n{"prompt": 3}\n'
                     b'{"prompt": "b", "id": [1]}\n{"prompt": "c"}')  # the last line has no newline: still read
    prompts, skipped = read_prompts(path)
    assert [p.text for p in prompts] == ["a", "c"] and skipped == 4


@SETTINGS
@given(hostile_bytes)
def test_prompt_and_question_files_of_any_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("in") / "f.jsonl"
    path.write_bytes(content)
    for reader in (read_prompts, load_questions):
        try:
            reader(path)
        except ChimeraError as exc:
            assert "\n" not in str(exc)


@pytest.mark.parametrize("line", [b'{"question_id": [1], "category": "qa", "turns": ["a"]}',
                                  b'{"question_id": 1, "category": "qa", "turns": "a"}',
                                  b'{"question_id": 1, "category": "", "turns": ["a"]}', b"\xff"])
def test_bad_question_lines(tmp_path, line):
    path = tmp_path / "q.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(ChimeraError, match=r"q.jsonl:1"):
        load_questions(path)


# ------------------------------------------------------------------------------------- bench output


def bench_config(**overrides) -> BenchConfig:
    return BenchConfig(**{"questions": "q", "questions_sha256": "0", "categories": None, "limit": None,
                          "max_new_tokens": 4, "methods": ["hf"], "model": "m", "dtype": "float32",
                          "device": "cpu", **overrides})


@pytest.mark.parametrize("content", [os.urandom(64), b"[1, 2]", b"{" * 50_000])
def test_bench_settings_file_of_garbage_is_refused(tmp_path, content):
    (tmp_path / "bench_config.json").write_bytes(content)
    with pytest.raises(ChimeraError, match="use another --out directory"):
        prepare_out_dir(tmp_path, bench_config())
    assert (tmp_path / "bench_config.json").read_bytes() == content


def test_a_resume_file_with_a_bad_line_is_refused_and_untouched(tmp_path):
    good = {"question_id": 1, "category": "qa", "choices": [{"turns": ["a"], "decoding_steps": [1],
            "new_tokens": [1], "wall_time": [0.1], "accept_lengths": [[1]], "token_ids": [[5]]}]}
    file = tmp_path / "hf.jsonl"
    for bad in (b"\xff\xfe\n", b'{"question_id": [1]}\n', b"[]\n"):
        file.write_bytes(json.dumps(good).encode() + b"\n" + bad)
        with pytest.raises(ChimeraError, match=r"hf.jsonl:2"):
            done_questions(file)
        assert file.read_bytes().endswith(bad)
    file.write_bytes(json.dumps(good).encode() + b"\n" + b'{"question_id": 2, "cat')  # torn by a kill
    assert done_questions(file) == {1}  # the bench owns its directory: it cuts the torn line off
    assert file.read_bytes().endswith(b"\n")


# ------------------------------------------------------------------------------------- command-line values


@pytest.mark.parametrize("argv,needle", [(["--tree", "100000"], "up to 1024"), (["--tree", "9" * 5000], "up to"),
                                         (["--tree", "dynamic-100000"], "up to 1024"),
                                         (["--tree", "dynamic-64-1000"], "up to 64"),
                                         (["--temperature", "1e-300"], "temperature"),
                                         (["--temperature", "5e-324"], "temperature"),
                                         (["--temperature", "nan"], "temperature")])
def test_out_of_range_options(capsys, argv, needle):
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--max-new-tokens", 2, *argv), needle)


def test_a_prompt_that_is_not_utf8():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "chimera.cli", "generate", b"caf\xe9", "--max-new-tokens", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.strip() == "chimera: error: the prompt is not valid UTF-8"



@pytest.mark.parametrize("name,content,needle", [("meta.json", b"\x8f\x00garbage", "not valid UTF-8"),
                                                 ("meta.json", b"[]", "expected a JSON object, got an array"),
                                                 ("index.jsonl", b"{}\n", "missing field 'id'")])
def test_train_on_damaged_data_is_one_line_and_changes_nothing(capsys, tmp_path, name, content, needle):
    data = distilled(tmp_path / "data")
    (data / name).write_bytes(content)
    before = digest(data)
    assert_one_line_error(*run_cli(capsys, "train", "--data", data, "--out", tmp_path / "run"), needle)
    assert digest(data) == before and not (tmp_path / "run").exists()
