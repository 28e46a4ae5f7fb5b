# distillc: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create .venv, install the pinned packages (constraints.txt) and, when missing and
# running as root, the Debian packages for the ARM toolchain and QEMU.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup toolchain demo test clean

setup: $(STAMP) toolchain

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

toolchain:
	@bash scripts/install-toolchain.sh

demo: setup
	$(BIN)/distillc compile examples/quickstart/spec.toml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) examples/*/build examples/*/.distillc-cache .pytest_cache
