# The two commands the README opens with. Each does its own set-up (scripts/setup.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup demo test test-all lint clean

setup:
	@bash scripts/setup.sh

## demo: GRPO with the ToRL tool protocol on the embedded SmolLM2-135M-Instruct (CPU, ~10 min)
demo: setup
	$(PY) -m tirl train --config demo $(ARGS)

## test: the default (CPU-fast) test suite
test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

## test-all: every test, slow ones included
test-all: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
