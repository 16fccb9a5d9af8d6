# The two commands of the README. Both run the (idempotent) set-up first.
PYTHON ?= python3
RECIPE ?= recipes/knowledge/smollm2-135m-cpu.yaml

.PHONY: install demo test lint

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

# One real ReST-EM round of SEAL on the embedded model; prints the round table.
demo: install
	$(PYTHON) -m accelerate.commands.launch --config_file recipes/accelerate/cpu.yaml \
		scripts/seal_knowledge.py --config $(RECIPE)

lint:
	$(PYTHON) -m ruff check .

test: install lint
	$(PYTHON) -m pytest -q
