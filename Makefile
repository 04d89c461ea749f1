# The two commands of the README: `make demo` and `make test`. Both install what is missing,
# bring the local stack up (idempotent) and are quick the second time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install stack demo influx2 test bench down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

stack: install
	$(BIN)/laggard stack up

demo: stack
	$(BIN)/laggard demo

# Headless Chromium renders the report page in tests/test_report.py.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

# InfluxDB 2.7's influxd for tests/test_influx2.py, built from source once per machine (~13
# CPU-minutes and ~3 GB under ~/.cache/laggard/influxd-2.7.12; nothing to do once it is there).
influx2: install
	$(BIN)/python -m laggard.commands.stack.build_influxd

# Pure-logic tests first, stopping at the first failure, before the stack is even started; then
# the tests on real services (marked `stack`, see tests/conftest.py), a file per pytest-xdist
# worker: they mostly wait on Kafka, Faust and timers, so three share the two cores.
STACK_TEST_WORKERS ?= 3
test: install $(CHROMIUM)
	$(BIN)/pytest -q -m "not stack" -x $(PYTEST_ARGS)
	$(MAKE) stack influx2
	$(BIN)/pytest -q -m stack -n $(STACK_TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: stack
	$(BIN)/python bench/collectors.py
	$(BIN)/python bench/agents.py
	$(BIN)/python bench/sink.py
	$(BIN)/python bench/scale.py

down:
	-$(BIN)/laggard stack down

clean: down
	rm -rf $(VENV) .stack
