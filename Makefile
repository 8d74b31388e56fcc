# convey: `make demo` shows it working, `make test` runs the whole suite. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= samples/sample-passthrough.toml
MODE ?= passthrough
PYTEST_ARGS ?=

.PHONY: help deps venv demo demo-cluster test test-fast test-workers test-unit test-netns lint format bench bench-quick install-rules remove-rules \
        show-rules clean-netns clean

help:
	@echo "make demo                  build a namespace test bed, run convey in every mode, show traffic and /stats"
	@echo "make demo-cluster          two balancers behind a BGP/ECMP router (BIRD 2): spread, kill one mid-download"
	@echo "make test                  install what is needed and run the whole test suite (root for netns tests)"
	@echo "make test-fast             every test that needs no root (unit, proxy relay, proxy end to end): < 1 min"
	@echo "make test-workers          the packet and proxy suites with 2 (and 4) worker processes (root, ~10 min)"
	@echo "make lint                  ruff + mypy --strict on convey/"
	@echo "make bench                 proxy and packet-path benchmarks (ratios against HAProxy/kernel/accept-only)"
	@echo "make install-rules CONFIG=FILE [MODE=passthrough|dsr]   iptables rules + sysctls in this namespace"
	@echo "                   [OFFLOAD=1]                           the flow offload rule set (show-rules too)"
	@echo "                   [WORKERS=N]                           N queues, as convey --workers=N (show-rules too)"
	@echo "make remove-rules  CONFIG=FILE                           remove exactly those rules"
	@echo "make clean-netns           remove leftover test namespaces (cvy-*): python -m testbed clean"

# System packages (Debian): iptables, nftables, iproute2, libnetfilter-queue for the NFQUEUE binding, haproxy and
# curl for benchmarks and tests. Installs only what is missing; needs root to install.
deps:
	@bash scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/demo.py

# A tier of balancers announcing the VIP over BGP to a router with ECMP (docs/scale-out.md); root and bird2.
demo-cluster: venv
	$(PY) scripts/demo_cluster.py

test: venv
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Tests under tests/netns/ carry the `netns` marker (tests/netns/conftest.py); everything else needs no root.
test-fast: venv
	$(PY) -m pytest tests -m "not netns" $(PYTEST_ARGS)

# The passthrough, DSR and proxy end-to-end suites again with 2 worker processes, the packet suites with 4 too
# (~10 minutes; not part of `make test`, which runs tests/netns/test_workers.py and tests/e2e/test_proxy_workers.py
# instead). Root.
test-workers: venv
	CONVEY_TEST_WORKERS=2 $(PY) -m pytest tests/netns/test_passthrough.py tests/netns/test_dsr.py tests/e2e \
	  $(PYTEST_ARGS)
	CONVEY_TEST_WORKERS=4 $(PY) -m pytest tests/netns/test_passthrough.py tests/netns/test_dsr.py $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-netns: venv
	$(PY) -m pytest tests/netns $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check convey testbed tests bench scripts
	$(VENV)/bin/ruff format --check convey testbed tests bench scripts
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format convey testbed tests bench scripts
	$(VENV)/bin/ruff check --fix convey testbed tests bench scripts

bench: venv
	$(PY) bench/proxy.py
	$(PY) bench/packet.py

bench-quick: venv
	$(PY) bench/proxy.py --quick
	$(PY) bench/packet.py --quick

install-rules: venv
	$(VENV)/bin/convey rules install --config=$(CONFIG) $(if $(filter dsr,$(MODE)),--dsr,--passthrough) \
	  $(if $(filter 1 yes true,$(OFFLOAD)),--offload) $(if $(WORKERS),--workers=$(WORKERS))

remove-rules: venv
	$(VENV)/bin/convey rules remove --config=$(CONFIG)

show-rules: venv
	$(VENV)/bin/convey rules show --config=$(CONFIG) $(if $(filter dsr,$(MODE)),--dsr,--passthrough) \
	  $(if $(filter 1 yes true,$(OFFLOAD)),--offload) $(if $(WORKERS),--workers=$(WORKERS))

clean-netns:
	@if [ -x $(PY) ]; then $(PY) -m testbed clean; \
	else for ns in $$(ip netns list | awk '{print $$1}' | grep '^cvy-'); do \
	  for pid in $$(ip netns pids $$ns); do kill -9 $$pid; done; ip netns del $$ns; echo "removed $$ns"; done; fi

clean: clean-netns
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
