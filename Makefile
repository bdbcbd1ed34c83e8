# The book's two commands: `make book` renders it, `make test` tests it. Both create .venv on first use.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PROFILE ?= default
CH      ?=
ARGS    ?=

.PHONY: book test chapter html bench clean venv browser

venv: $(STAMP)

# Re-install whenever pyproject.toml changes. pip (not uv/poetry): torch lies on this machine's disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

## make book [PROFILE=default|smoke|paper]: execute every chapter, then build _build/html/index.html
book: $(STAMP)
	$(PY) -m helpers.build book --profile $(PROFILE)

## make chapter CH=<name> [PROFILE=...] [ARGS="key=value ..."]: re-run one chapter, rebuild the HTML
chapter: $(STAMP)
	@test -n "$(CH)" || { echo "error: name the chapter, e.g. make chapter CH=intro ARGS='seed=1'"; exit 2; }
	$(PY) -m helpers.build chapter $(CH) --profile $(PROFILE) $(foreach a,$(ARGS),--set $(a))

## make html: rebuild the HTML from the executed notebooks of PROFILE
html: $(STAMP)
	$(PY) -m helpers.build html --profile $(PROFILE)

## make test: unit tests, every chapter in the smoke profile, a smoke build of the book, and a browser check.
# Two pytest workers (pytest-xdist), one test file at a time each: the smoke book is built once (tests/conftest.py
# shares it under a file lock) while the other worker runs the unit tests.
test: $(STAMP) browser
	$(PY) tools/timed.py make-test -- $(PY) -m pytest -n 2 --dist loadfile

# Headless Chromium for tests/test_browser.py: Debian's package, installed when absent and we are root.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing Debian's chromium for the browser test"; \
	      (apt-get install -y -q chromium >/dev/null 2>&1 || \
	       { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) || \
	      echo "warning: could not install chromium; tests/test_browser.py will say how"; \
	    else echo "note: chromium is missing; install it with: sudo apt-get install -y chromium"; fi; }

## make bench: helpers against captum, dattri, kronfluence and pyDVL on problems P1 and P2 (benchmarks/peers; long, on demand)
# The peers live outside the tested set: captum, dattri and kronfluence in the `bench` extra of .venv, pyDVL (numpy<2) in its
# own .venv-pydvl, run as a subprocess. Never part of `make test`.
PYDVL   := .venv-pydvl
BENCH_STAMP := $(VENV)/.bench-installed
PYDVL_STAMP := $(PYDVL)/.installed

# kronfluence 1.0.1's wheel ships its own test suite as a top-level package named `tests`, which would shadow this
# repository's tests/ (a namespace package) and break `make test`: it is removed right after the install.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	rm -rf $(VENV)/lib/python*/site-packages/tests
	touch $@

$(PYDVL_STAMP): benchmarks/peers/requirements-pydvl.txt
	test -x $(PYDVL)/bin/python || $(PYTHON) -m venv $(PYDVL)
	$(PYDVL)/bin/python -m pip install --quiet --upgrade pip
	$(PYDVL)/bin/python -m pip install --quiet -r benchmarks/peers/requirements-pydvl.txt
	touch $@

bench: $(BENCH_STAMP) $(PYDVL_STAMP)
	$(PY) -m benchmarks.peers.run $(ARGS)

clean:
	rm -rf _build
