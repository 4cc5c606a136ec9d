# Two environments (see README): .venv = torch 2.13 CPU + Lightning + Triton,
# .venv-composer = mosaicml 0.32.1 with its torch 2.7. Core tests run in both.
PYTHON ?= python3
MAIN := .venv
COMPOSER := .venv-composer
REPORTS := .ci/reports
# Triton kernels run on CPU tensors through Triton's interpreter.
export TRITON_INTERPRET := 1

.PHONY: env env-composer test test-main test-composer run run-quick run-composer lint benchmark \
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

## The whole test suite, both environments, from nothing. The two environments' suites
## (and their installs) run side by side: each keeps about one core busy, and together
## they take about as long as the longer one. Each one's output is printed whole when it
## ends (--output-sync), not interleaved.
test:
	$(MAKE) -j2 --output-sync=target test-main test-composer
	$(MAIN)/bin/python .ci/check_junit.py $(REPORTS)/main.xml $(REPORTS)/composer.xml

test-main: env
	mkdir -p $(REPORTS)
	$(MAIN)/bin/ruff check .
	$(MAIN)/bin/python -m pytest tests/core tests/lightning_adam --junitxml=$(REPORTS)/main.xml

## The Composer suite takes the core test files in reverse order: run in the same order,
## both suites reached each C kernel at the same time and one waited on the other's
## build (a lock per kernel) with its core idle; in opposite orders each builds the
## kernels of the files it meets first, and finds the rest built.
CORE_FILES_REVERSED = $(shell ls -r tests/core/test_*.py)

test-composer: env-composer
	mkdir -p $(REPORTS)
	$(COMPOSER)/bin/python -m pytest $(CORE_FILES_REVERSED) tests/composer_adam \
		--junitxml=$(REPORTS)/composer.xml

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
