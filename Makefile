# The README's commands.  `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: test demo bench build clean test-versions test-aarch64 wheel

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# The drivers compile against system libraries; where those are missing
# (outside CI) their tests skip and say which package to install.
$(VENV)/.installed: $(PY) pyproject.toml setup.py build_ffi.py $(wildcard csrc/* csrc/demo/*)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q -e '.[test,drivers]' || [ -z "$$GREENIFY_REQUIRE_SERVERS" ]
	touch $@

build: $(VENV)/.installed

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

demo: build
	$(PY) -m greenify.demo

bench: build
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/run.py $(if $(QUICK),--quick) $(if $(PEER),--peer-python $(PEER))

clean:
	rm -rf $(VENV) build greenify/_green*.so greenify/_green.c greenify/_green.o *.egg-info

# --- platforms (ci/): other CPythons, aarch64 under qemu-user, the wheel ------
# Each run records its outcome in ci/results.json; `python ci/results.py
# readme README.md` writes the README's statement from it.
CACHE ?= .cache
# the green functions, interruption, patching and faults
VERSION_TESTS ?= tests/test_green_io.py tests/test_green_poll.py tests/test_green_epoll.py \
	tests/test_green_sleep.py tests/test_green_where.py tests/test_interrupt.py \
	tests/test_patch.py tests/test_patch_errors.py tests/test_patch_on_load.py \
	tests/test_patch_targets.py tests/test_faults.py tests/test_fork.py
# ... and on aarch64 also the ELF reader, the inspector and MySQLdb
AARCH64_TESTS ?= $(VERSION_TESTS) tests/test_elf.py tests/test_inspect.py \
	tests/test_mysqldb.py tests/test_mysqldb_interrupt.py
AARCH64_ROOT ?= $(CACHE)/aarch64-root

# CPython 3.10, 3.12 and 3.13 (VERSIONS="3.10 3.12 3.13"), from pyenv or PATH
test-versions:
	ci/test-versions.sh $(VERSION_TESTS)

# needs root, debootstrap, qemu-user-static and binfmt-support
test-aarch64:
	ci/test-aarch64.sh $(AARCH64_ROOT) $(AARCH64_TESTS)

# dist/greenify-*.whl, and its manylinux copy in wheelhouse/; proven to
# install and run without a C compiler (ci/wheel.sh)
wheel:
	ci/wheel.sh
