# The two commands the README opens with. Each does its own set-up (scripts/setup.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup demo headline test test-all lint clean

setup:
	@bash scripts/setup.sh

## demo: the code-integrated arm of the laptop headline (recipe mini-retool) on the embedded
## SmolLM2-135M-Instruct: cold-start SFT on synthetic code traces, then GRPO with the sandbox (~12 min on 2 cores)
demo: setup
	$(PY) -m tirl train --config mini-retool $(ARGS)

## headline: both arms (code-integrated vs text-only) over three seeds, table + plot (~71 min on 2 cores)
headline: setup
	$(PY) -m tirl headline --seeds 0,1,2 --out runs/headline $(ARGS)

## test: the default (CPU-fast) test suite
test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

## test-all: every test, slow ones included
test-all: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
