# The README's commands.  `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CC ?= cc

.PHONY: build test demo bench check-readme driver-suites clean test-versions test-aarch64 wheel sanitize warnings record docs

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

GREENIFY_SOURCES := $(PY) pyproject.toml setup.py build_ffi.py $(wildcard csrc/*/*)

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

# The drivers' own test suites (psycopg2's, mysqlclient's, python-ldap's and
# pyodbc's from their sdists on PyPI; a named subset of psycopg 3's GitHub
# tests, copied into tests/driver_suites/psycopg-tests/), stock and
# greenified, against the suite's servers; fails if greenify breaks a test.
# Its results go to .results/ (`make record` puts them in the README).
driver-suites: build
	$(PY) -m tests.driver_suites.run

bench: build
	$(PIP) install -q -e '.[bench]'
	$(PY) -m bench.run $(if $(QUICK),--quick) $(if $(PEER),--peer-python $(PEER))
	$(PY) -m bench.asyncio_bench $(if $(QUICK),--quick)
	$(PY) -m bench.watch_overhead $(if $(QUICK),--rounds 3 --output .results/bench/watch-quick.json)

# Runs write their results under .results/ (ignored): `make test`, `make
# bench`, `make driver-suites`, `make test-versions`, `make test-aarch64` leave
# the checkout as it was.  `make record` copies the ones this checkout has over
# the committed files (tests/compat-results.json, tests/tls-results.json,
# tests/driver_suites/results.json, ci/results.json, bench/results.json and
# .png, bench/asyncio-results.json) and renders the generated tables from them.
# Record a whole run only: a run of one test file leaves other rows "not run".
# Where each generated part lives (tests/support/readme_sections.py): the compatibility
# table in the README, the others in the documentation's pages.
COMPAT_DOC ?= README.md
TLS_DOC ?= docs/guide.md
PLATFORMS_DOC ?= docs/platforms.md
BENCH_DOC ?= docs/benchmarks.md
record: $(VENV)/.base
	$(PY) -m tests.support.compat --record $(COMPAT_DOC)
	$(PY) -m tests.support.tls_results --record $(TLS_DOC)
	$(PY) -m tests.driver_suites.run --record $(PLATFORMS_DOC)
	$(PY) -m ci.results readme $(PLATFORMS_DOC) --record
	$(PY) -m bench.run --record $(BENCH_DOC)
	$(PY) -m bench.asyncio_bench --record $(BENCH_DOC)
	$(PY) -m bench.watch_overhead --record

# Fails when any generated part of the README or the documentation
# (tests/support/readme_sections.py) differs from the recorded run it is rendered from.
check-readme: $(VENV)/.base
	$(PY) -m tests.support.compat --check $(COMPAT_DOC)
	$(PY) -m tests.support.tls_results --check $(TLS_DOC)
	$(PY) -m tests.driver_suites.run --check $(PLATFORMS_DOC)
	$(PY) -m ci.results readme $(PLATFORMS_DOC) --check
	$(PY) -m bench.run --check $(BENCH_DOC)
	$(PY) -m bench.asyncio_bench --check $(BENCH_DOC)

# The documentation site (mkdocs.yml, docs/), built into .results/site with
# warnings as errors: a broken link or anchor, a missing snippet or a page
# left out of the navigation fails it.
$(VENV)/.docs: pyproject.toml | $(VENV)/.base
	$(PIP) install -q -e '.[docs]'
	touch $@

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir .results/site

# libgreenify builds without a warning under its own flags (build_ffi.py:
# -Wall -Wextra), made errors here; built in $(CACHE)/warnings, not in place.
warnings: $(VENV)/.base
	CFLAGS=-Werror $(PY) setup.py -q build_ext --force --build-lib $(CACHE)/warnings --build-temp $(CACHE)/warnings/temp

# The differential test of the green twins against libc, run long:
# `make fuzz` (EXAMPLES=n per mode, default 2000; SEED=n to replay a run).
.PHONY: fuzz
fuzz: $(VENV)/.installed
	GREENIFY_FUZZ_EXAMPLES=$(or $(EXAMPLES),2000) $(PY) -m pytest tests/twins/test_differential.py -q -s --timeout 0 \
		$(if $(SEED),--hypothesis-seed=$(SEED))

clean:
	rm -rf $(VENV) build greenify/_green*.so greenify/_green.c greenify/_green.o *.egg-info

# --- platforms (ci/): other CPythons, aarch64 under qemu-user, the wheel ------
# Each run records its outcome in .results/ci/results.json; `make record`
# copies it to ci/results.json and writes the README's statement from it.
CACHE ?= .cache
# the green functions, interruption, patching, faults (and, on the CPythons, the C API)
VERSION_BASE_TESTS = tests/twins/test_green_io.py tests/twins/test_green_poll.py tests/twins/test_green_epoll.py \
	tests/twins/test_green_sleep.py tests/wait/test_green_where.py tests/wait/test_fast_wait.py tests/twins/test_refused_poll.py \
	tests/wait/test_interrupt.py \
	tests/patching/test_patch.py tests/patching/test_patch_errors.py tests/patching/test_patch_on_load.py \
	tests/patching/test_patch_targets.py tests/wait/test_faults.py tests/wait/test_fork.py
# (the versions' venvs install no driver: psycopg2's case of test_interrupt_reaches_caller runs in `make test`)
VERSION_TESTS ?= $(VERSION_BASE_TESTS) tests/twins/test_capi.py tests/wait/test_wake_after_reuse.py \
	tests/wait/test_interrupt_reaches_caller.py tests/twins/test_errno_untouched.py \
	--deselect tests/wait/test_interrupt_reaches_caller.py::test_every_timeout_around_a_fresh_psycopg2_connection_surfaces_as_itself
# ... and on aarch64 also the ELF reader (its C walk of the relocations against
# the careful one), the inspector, MySQLdb, the C API, wakes after a reused
# descriptor and errno
AARCH64_TESTS ?= $(VERSION_BASE_TESTS) tests/patching/test_elf.py tests/patching/test_elf_fast_read.py \
	tests/tools/test_inspect.py tests/drivers/test_mysqldb.py tests/drivers/test_mysqldb_interrupt.py \
	tests/twins/test_capi.py tests/wait/test_wake_after_reuse.py tests/twins/test_errno_untouched.py
AARCH64_ROOT ?= $(CACHE)/aarch64-root

# The suite against a build of libgreenify with ASan (heap and globals) and
# UBSan in $(CACHE)/sanitize; the differential test under UBSan alone
# (ci/sanitize.sh says why); the ELF reader's tests too, the seeded damaged
# copies included: its walk of the relocations is C (csrc/patch/relocs.c);
# not the inspector's case that imports a module from its current folder,
# which PYTHONSAFEPATH (ci/sanitize.sh) keeps off sys.path.  Any sanitizer
# report fails the run.
SANITIZE_TESTS ?= tests --ignore=tests/twins/test_differential.py \
	--deselect 'tests/tools/test_inspect.py::test_bad_input_is_one_line_on_stderr_and_exit_status_2[module that fails to import]'
SANITIZE_UBSAN_TESTS ?= tests/twins/test_differential.py
sanitize: build
	PY=$(PY) CACHE=$(CACHE) ci/sanitize.sh $(SANITIZE_TESTS) -- $(SANITIZE_UBSAN_TESTS)

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
