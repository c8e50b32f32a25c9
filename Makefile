# vlalign developer commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_run

.PHONY: install test demo demo-finetune lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,dvae]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -m "not gpu" tests

# A fixed number of training steps (load only makes it slower); e.g. make demo DEMO_ARGS="--seed 43"
demo: install
	$(BIN)/python -m vlalign.cli.demo --out $(DEMO_DIR) $(DEMO_ARGS)

# Fine-tuning of the demo model (reuses `make demo`'s checkpoint in $(DEMO_DIR), or runs it first): retrieval by
# default (zero-shot vs fine-tuned recall, hard-negative accuracy); --tasks adds VQA, NLVR2, SNLI-VE and grounding,
# each metric next to chance; e.g. make demo-finetune DEMO_FINETUNE_ARGS="--tasks all" (or "--tasks vqa,grounding")
demo-finetune: install
	$(BIN)/python -m vlalign.cli.demo_finetune --out $(DEMO_DIR) $(DEMO_FINETUNE_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/python -m benchmarks.run --device cpu

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
