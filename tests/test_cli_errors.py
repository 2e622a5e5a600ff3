"""Bad input gets one clear line on stderr and exit status 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from chimera.cli import main
from chimera.models import embedded_gguf


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("chimera: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_empty_prompt(capsys):
    assert_one_line_error(*run_cli(capsys, "generate", "   ")[::2], "empty prompt")


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_max_new_tokens(capsys, value):
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--max-new-tokens", value)[::2], "max-new-tokens")


@pytest.mark.parametrize("value", ["0", "some", "-5"])
def test_bad_draft_vocabulary(capsys, value):
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--draft-vocab", value)[::2], "draft-vocab", value)


def test_unknown_dtype_and_device(capsys):
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--dtype", "float8")[::2], "dtype", "float8")
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--device", "tpu")[::2], "device", "tpu")


def test_cuda_on_machine_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--device", "cuda")[::2], "cuda")


def test_unknown_model_name(capsys):
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--model", "no-such-org/no-such-model")[::2],
                          "no-such-org/no-such-model")
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--model", "./missing/dir")[::2], "does not exist")


def test_path_that_is_not_a_model(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--model", str(text))[::2], "is not a model")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--model", str(empty))[::2], "config.json")


def test_corrupt_gguf(capsys, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--model", str(garbage))[::2], "not a GGUF")
    truncated = tmp_path / "truncated.gguf"
    with embedded_gguf("smollm2-135m-instruct").open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    assert_one_line_error(*run_cli(capsys, "generate", "hi", "--model", str(truncated))[::2], "GGUF")


def test_prompt_longer_than_context(capsys, default_model):
    code, _, err = run_cli(capsys, "generate", "word " * 9000, "--max-new-tokens", "4")
    assert_one_line_error(code, err, "context")


def test_console_script_json_output():
    proc = subprocess.run(
        [sys.executable, "-m", "chimera.cli", "generate", "What is 2+2?", "--max-new-tokens", "8", "--json",
         "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) >= {"text", "token_ids", "new_tokens", "steps", "tau", "seconds", "tokens_per_s"}
    assert data["new_tokens"] == len(data["token_ids"]) <= 8
    assert data["tau"] == pytest.approx(data["new_tokens"] / data["steps"], abs=1e-3)


def test_console_script_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "chimera.cli", "generate", ""], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "chimera: error: empty prompt"


@pytest.mark.parametrize("argv, needle", [
    (["--port", "0"], "fixed port"),
    (["--replicas", "3", "--max-replicas", "2"], "below --replicas"),
    (["--replicas", "0"], "replicas"),
    (["--cpus-per-replica", "0"], "cpus-per-replica"),
    (["--timeout", "0"], "--timeout"),
])
def test_fleet_refuses_bad_shapes_before_starting_anything(capsys, argv, needle):
    assert_one_line_error(*run_cli(capsys, "fleet", *argv)[::2], needle)


def test_fleet_without_the_cluster_extra_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: importing it fails
    import chimera.server

    monkeypatch.delitem(sys.modules, "chimera.server.fleet", raising=False)
    monkeypatch.delattr(chimera.server, "fleet", raising=False)
    assert_one_line_error(*run_cli(capsys, "fleet")[::2], "cluster extra", "chimera-decoding[cluster]")


def test_the_engine_imports_without_the_web_stack():
    """``chimera throughput`` drives the engine alone: a machine without FastAPI (the GPU one) must still run it."""
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "from chimera.server.engine import Engine\nfrom chimera.server import Engine as Again\n"
            "import chimera.bench.throughput\nassert Engine is Again\n"
            "try:\n    from chimera.server import create_app\nexcept ImportError:\n    print('web stack refused')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "web stack refused"
