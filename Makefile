# The README's commands.  `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CC ?= cc

.PHONY: build test demo bench check-readme clean

build: $(VENV)/.installed $(VENV)/.drivers

# What building needs from the system, checked before anything is built:
# each missing piece is named with the Debian package that brings it.
PREREQUISITES = \
	missing=""; \
	command -v $(CC) >/dev/null 2>&1 || missing="$$missing\n  a C compiler ($(CC)): apt-get install gcc"; \
	if ! command -v $(PYTHON) >/dev/null 2>&1; then missing="$$missing\n  $(PYTHON): apt-get install python3"; else \
		$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
			2>/dev/null || missing="$$missing\n  the Python headers (Python.h): apt-get install python3-dev"; \
		$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing\n  the venv module: apt-get install python3-venv"; \
	fi; \
	if [ -n "$$missing" ]; then printf 'greenify: cannot build, missing:%b\n' "$$missing" >&2; exit 1; fi

$(PY):
	@$(PREREQUISITES)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

GREENIFY_SOURCES := $(PY) pyproject.toml setup.py build_ffi.py $(wildcard csrc/* csrc/demo/*)

# greenify and what it depends on: all the demo needs.
$(VENV)/.base: $(GREENIFY_SOURCES)
	@$(PREREQUISITES)
	$(PIP) install -q -e .
	touch $@

# ... and the test extras (installing them installs greenify too).
$(VENV)/.installed: $(GREENIFY_SOURCES)
	@$(PREREQUISITES)
	$(PIP) install -q -e '.[test]'
	touch $(VENV)/.base $@

# The drivers compile against system libraries.  Where those are missing
# their tests skip and name the package to install, and the stamp is not
# written, so the next `make` tries again; with GREENIFY_REQUIRE_SERVERS=1
# (CI) a failed install stops make.
$(VENV)/.drivers: pyproject.toml | $(VENV)/.installed
	@if $(PIP) install -q -e '.[test,drivers]'; then touch $@; \
	elif [ "$$GREENIFY_REQUIRE_SERVERS" = 1 ]; then \
		echo "greenify: installing the drivers failed (above), and GREENIFY_REQUIRE_SERVERS=1 needs them" >&2; exit 1; \
	else \
		echo "greenify: installing the drivers failed (above): their tests will skip, naming what is missing;" \
		     "the next make tries again" >&2; \
	fi

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.base
	$(PY) -m greenify.demo $(if $(ASYNCIO),--asyncio)

bench: build
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/run.py $(if $(QUICK),--quick) $(if $(PEER),--peer-python $(PEER))
	$(PY) bench/asyncio_bench.py $(if $(QUICK),--quick)

# Fails when the README's generated parts differ from what the last test run
# recorded (the compatibility table: tests/compat.py --check).
check-readme: $(VENV)/.base
	$(PY) tests/compat.py --check README.md

clean:
	rm -rf $(VENV) build greenify/_green*.so greenify/_green.c greenify/_green.o *.egg-info
