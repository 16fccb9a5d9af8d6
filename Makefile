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

# The numerics-sensitive tests run a second time on restricted kernels (no AVX/AVX512/AMX: oneDNN SSE4.1,
# ATen's default capability), so a tolerance that holds only on this machine's CPU fails here, on any CPU.
NUMERICS_TESTS = tests/test_multi_lora.py tests/test_ttt.py tests/test_attention.py tests/test_losses.py tests/test_qlora.py
RESTRICTED_ISA = ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default

test: install test-deps lint
	$(PYTHON) -m pytest -q
	$(RESTRICTED_ISA) $(PYTHON) -m pytest -q -p no:cacheprovider $(NUMERICS_TESTS)
