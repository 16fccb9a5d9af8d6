# The two commands of the README. Both run the (idempotent) set-up first.
PYTHON ?= python3
RECIPE ?= recipes/knowledge/smollm2-135m-cpu.yaml

.PHONY: install test-deps demo test lint

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

# System packages for the tests only (Debian's chromium + chromedriver for the review page's browser test).
test-deps:
	bash scripts/install_test_deps.sh

# One real ReST-EM round of SEAL on the embedded model; prints the round table.
demo: install
	$(PYTHON) -m accelerate.commands.launch --config_file recipes/accelerate/cpu.yaml \
		scripts/seal_knowledge.py --config $(RECIPE)

lint:
	$(PYTHON) -m ruff check .

test: install test-deps lint
	$(PYTHON) -m pytest -q
