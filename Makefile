# cltvit: the README's commands. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
ARTIFACTS ?= artifacts
BUNDLE ?= $(ARTIFACTS)/reference/bundle
PORT ?= 3000

.PHONY: setup data test serve bench load clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package (installed when missing and run as root).
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)); \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'" >&2; exit 1; fi; \
	fi

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
