# The two commands the README opens with. Each does its own set-up (scripts/setup.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup demo headline mixed test test-all lint clean

setup:
	@bash scripts/setup.sh

## demo: RL teaches the embedded SmolLM2-135M-Instruct *when* to use the tool (recipe mini-mixed, cut to fit a
## laptop: 96 traces, 4 GRPO steps, 32 held-out problems): a cold start that writes code on 30% of the problems
## whatever their kind, then GRPO with the sandbox on a mix of easy problems and 4-digit x 3-digit products; prints
## accuracy and code ratio per kind after SFT and after RL
demo: setup
	$(PY) -m tirl train --config mini-mixed sft.num_traces=96 train.steps=4 eval.limit=32 $(ARGS)

## headline: the papers' comparison, both arms (code-integrated vs text-only) over three seeds, table + plot (~71 min)
headline: setup
	$(PY) -m tirl headline --seeds 0,1,2 --out runs/headline $(ARGS)

## mixed: when to use the tool, mini-mixed and mini-mixed-cost over three seeds, per-kind table + plot
mixed: setup
	$(PY) -m tirl headline --experiment mixed --seeds 0,1,2 --out runs/mixed $(ARGS)

## test: the default (CPU-fast) test suite
test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

## test-all: every test, slow ones included
test-all: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
