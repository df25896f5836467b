# Two entry points: `make demo` (the main job) and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA wheels.
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

FASHION := /usr/share/datasets/fashion-mnist

demo: $(STAMP)
	# Fashion-MNIST from Debian's package where we may install it (root, or passwordless
	# sudo); otherwise this step and the demo's table say loudly that it fell back to digits.
	test -d $(FASHION) || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -qq dataset-fashion-mnist || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist))) || \
	(command -v sudo >/dev/null && sudo -n true 2>/dev/null && \
		(sudo apt-get install -y -qq dataset-fashion-mnist || \
		 (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist))) || true
	@test -d $(FASHION) || test -n "$$SPARSEKIT_DATA_DIR" || \
		echo "*** make demo: Fashion-MNIST is NOT installed ($(FASHION) missing; needs root for" \
		     "apt-get install dataset-fashion-mnist): the demo FALLS BACK to 8x8 digits ***" >&2
	$(VENV)/bin/sparsekit demo --out demo_out

test: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks experiments)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks experiments)

clean:
	rm -rf $(VENV) demo_out
