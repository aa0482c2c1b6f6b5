# Fresh machine: `make serve` starts the server, `make test` runs the tests (CI runs `make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install test test-unit serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The numerics, MoE, linear and CLI tests run a second time with the CPU fast paths off
# (GPTOSS_CPU_FALLBACK=1) on CPUs that have them; elsewhere the first pass already ran the fallback.
FALLBACK_TESTS := tests/model_shards tests/deploy/cli/test_cli.py

test: install
	$(PY) -m pytest -q
	@if $(PY) -m model_shards.capabilities --has-fast-bf16; then \
		echo "the same CPU tests with the fallback forced (GPTOSS_CPU_FALLBACK=1):"; \
		GPTOSS_CPU_FALLBACK=1 $(PY) -m pytest -q $(FALLBACK_TESTS); \
	else \
		echo "this CPU has no oneDNN bf16 path: the tests above ran the fallback (docs/cpu.md)"; \
	fi

# The fast tier: tests that start neither Ray nor a server and take under a few seconds each
# (conftest.py and the `slow` marks say which are not).
test-unit: install
	$(PY) -m pytest -q -m "not ray and not server and not slow"

# Offline: make serve VOCAB_DIR=path/to/dir-with-o200k_base.tiktoken; more flags: SERVE_ARGS="--port 9000"
serve: install
	$(VENV)/bin/gptoss $(if $(VOCAB_DIR),--vocab-dir $(VOCAB_DIR)) serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
