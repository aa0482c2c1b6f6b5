# Fresh machine: `make serve` starts the server, `make test` runs the tests (CI runs `make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install test serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

# Offline: make serve VOCAB_DIR=path/to/dir-with-o200k_base.tiktoken; more flags: SERVE_ARGS="--port 9000"
serve: install
	$(VENV)/bin/gptoss $(if $(VOCAB_DIR),--vocab-dir $(VOCAB_DIR)) serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
