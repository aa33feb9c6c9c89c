# orbcast — the two commands a new user needs are `make demo` and `make test`.
# Both create .venv and install the project into it first; nothing else is
# needed on the machine but Python 3.11+ (python3-venv is installed with
# apt-get when Debian's split-off venv module is missing and we are root).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test bench soak venv clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "orbcast needs Python >= 3.11"'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    echo "python3 -m venv failed; installing python3-venv" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	    rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m orbcast.demo

test: $(STAMP)
	$(PY) -m pytest -q

# bench also measures the peers (bench/peers.py): their Python clients (the `bench`
# extra) and their servers (Debian packages, apt-get only for a binary that is absent)
BENCH_STAMP   = $(VENV)/.bench-installed
BENCH_SERVERS = redis-server nats-server mosquitto

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; for b in $(BENCH_SERVERS); do \
	    command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; \
	done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then \
	        echo "bench needs$$missing: apt-get install -y --no-install-recommends$$missing (as root)" >&2; \
	        exit 1; fi; \
	    echo "installing$$missing for the bench's peers" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends$$missing >/dev/null; \
	fi
	$(PY) -m bench.run

soak: $(STAMP)
	$(PY) -m pytest -q -m soak

clean:
	rm -rf $(VENV) demo-data .pytest_cache
