# The README's commands.  `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: test demo bench build clean

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
	$(PY) -m greenify.demo $(if $(ASYNCIO),--asyncio)

bench: build
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/run.py $(if $(QUICK),--quick) $(if $(PEER),--peer-python $(PEER))
	$(PY) bench/asyncio_bench.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) build greenify/_green*.so greenify/_green.c greenify/_green.o *.egg-info
