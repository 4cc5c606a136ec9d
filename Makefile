# Two environments (see README): .venv = torch 2.13 CPU + Lightning + Triton,
# .venv-composer = mosaicml 0.32.1 with its torch 2.7. Core tests run in both.
PYTHON ?= python3
MAIN := .venv
COMPOSER := .venv-composer
REPORTS := .ci/reports
# Triton kernels run on CPU tensors through Triton's interpreter.
export TRITON_INTERPRET := 1
# The parts of `make test` (below).
TEST_PARTS := test-main-core test-composer-core test-main-lightning test-composer-adapter

.PHONY: env env-composer test test-lane-1 test-lane-2 test-main test-composer $(TEST_PARTS) run run-quick run-composer lint benchmark \
	compile-check gpu-check

$(MAIN)/.installed: pyproject.toml .ci/constraints-main.txt
	$(PYTHON) -m venv $(MAIN)
	$(MAIN)/bin/pip install --quiet -c .ci/constraints-main.txt -e ".[lightning,triton,dev]"
	touch $@

$(COMPOSER)/.installed: pyproject.toml .ci/constraints-composer.txt
	$(PYTHON) -m venv $(COMPOSER)
	$(COMPOSER)/bin/pip install --quiet -c .ci/constraints-composer.txt -e ".[composer]" pytest hypothesis matplotlib
	touch $@

env: $(MAIN)/.installed
env-composer: $(COMPOSER)/.installed

## The whole test suite, both environments, from nothing, in four parts: each
## environment's core tests and its adapter's tests. Both environments are installed side
## by side first; then two lanes run side by side (each keeps about one core busy), each
## one long core part and then the other environment's short adapter part, so the lanes
## end about together. Each lane's output is printed whole when it ends (--output-sync).
test:
	$(MAKE) -j2 --output-sync=target env env-composer
	$(MAKE) -j2 --output-sync=target test-lane-1 test-lane-2
	$(MAIN)/bin/python .ci/check_junit.py $(patsubst test-%,$(REPORTS)/%.xml,$(TEST_PARTS))

test-lane-1:
	$(MAKE) -j1 test-main-core test-composer-adapter

test-lane-2:
	$(MAKE) -j1 test-composer-core test-main-lightning

## One environment's whole suite.
test-main: test-main-core test-main-lightning
test-composer: test-composer-core test-composer-adapter

test-main-core: env
	mkdir -p $(REPORTS)
	$(MAIN)/bin/ruff check .
	$(MAIN)/bin/python -m pytest tests/core --junitxml=$(REPORTS)/main-core.xml

test-main-lightning: env
	mkdir -p $(REPORTS)
	$(MAIN)/bin/python -m pytest tests/lightning_adam --junitxml=$(REPORTS)/main-lightning.xml

test-composer-core: env-composer
	mkdir -p $(REPORTS)
	$(COMPOSER)/bin/python -m pytest tests/core --junitxml=$(REPORTS)/composer-core.xml

test-composer-adapter: env-composer
	mkdir -p $(REPORTS)
	$(COMPOSER)/bin/python -m pytest tests/composer_adam --junitxml=$(REPORTS)/composer-adapter.xml

## The main job: train and compare optimizers through LightningCLI; results in outputs/main_job/.
run: env
	$(MAIN)/bin/python examples/main_job.py

run-quick: env
	$(MAIN)/bin/python examples/main_job.py --quick

## The same comparison through composer.Trainer; results in outputs/composer_job/.
run-composer: env-composer
	$(COMPOSER)/bin/python examples/composer_compare.py

benchmark: env
	$(MAIN)/bin/python examples/benchmark.py $(BENCHMARK_ARGS)

## Every launchable Triton specialisation compiled for sm_80/90/100 (CI compiles one
## per family); no GPU needed.
compile-check: env
	ADAMKIT_ALL_SPECIALIZATIONS=1 $(MAIN)/bin/python -m pytest tests/core/test_triton_compile.py

## On a GPU machine: the GPU tests and the GPU benchmark, one table (README, "GPU check").
## Runs in the Python given (one with CUDA torch and Triton); builds and installs nothing.
GPU_PYTHON ?= python3
gpu-check:
	TRITON_INTERPRET=0 $(GPU_PYTHON) .ci/gpu_check.py

lint: env
	$(MAIN)/bin/ruff check . && $(MAIN)/bin/ruff format --check .
