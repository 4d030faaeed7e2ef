# Two commands are all a user needs: `make demo` and `make test`.
# Both create .venv on first use and install the pinned environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-all lint bench bench-cnn install clean package docs notebook

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: it is the CPU wheel; a bare `torch` would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onlynorm demo

# Lint, types and structure (module/function size, import cycles) first: a finding fails the run like a failing test.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy
	$(PY) scripts/check_size.py src
	$(PY) scripts/check_imports.py src/onlynorm

test: lint
	$(PY) -m pytest -q -n 2 -m "not heavy"

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2

# The benchmarks, then the heavy test cases `make test` leaves out (so every case runs somewhere).
bench: $(STAMP)
	$(PY) benchmarks/run.py
	$(PY) benchmarks/tied.py --json docs/results/bench-tied.json
	$(PY) -m pytest -q -n 2 -m heavy
	$(MAKE) bench-cnn

# Real architectures: conv deep vs conv width on one layer, the ResNet-20 certificate before/after norm bounds,
# ResNet-18/50 at 224² by deep, tied=True (one child process per model), then the ResNet demo with --imagenet
# (ResNet-20, and ResNet-18/50 reconstructed in-process).
bench-cnn: $(STAMP)
	$(PY) benchmarks/conv_deep.py --json docs/results/bench-conv-deep.json
	$(PY) benchmarks/certify_resnet.py --json docs/results/bench-certify.json
	$(PY) benchmarks/resnet_imagenet.py --json docs/results/bench-resnet-imagenet.json
	$(VENV)/bin/onlynorm demo --resnet --imagenet --json docs/results/demo-resnet.json

# sdist + wheel into dist/, then install the wheel into a fresh venv and run it (tests/test_package.py does the same)
package: $(STAMP)
	rm -rf dist build/package-check
	$(PY) -m build --no-isolation --outdir dist .
	$(PY) scripts/check_wheel.py dist build/package-check

# the documentation site in site/ (broken references fail the build; tests/test_docs.py builds it too)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# re-execute the tutorial in place: the outputs the site shows (tests/test_notebook.py executes it too)
notebook: $(STAMP)
	$(VENV)/bin/jupyter-execute --inplace docs/tutorial.ipynb

clean:
	rm -rf $(VENV) build dist site *.egg-info src/*.egg-info .pytest_cache .hypothesis
