# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := ./data
CONFIG := $(DATA)/homeserver.toml

.PHONY: run test bench demo conformance clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

$(CONFIG): | $(VENV)/.installed
	$(VENV)/bin/securechat-server init $(DATA) --domain localhost --port 8448 --http-port 8449

run: $(VENV)/.installed $(CONFIG)
	$(VENV)/bin/securechat-server run --config $(CONFIG)

test: $(VENV)/.installed-test
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/crypto.py
	$(PY) bench/relay.py
	$(PY) bench/e2e.py
	$(PY) bench/federation.py

conformance: $(VENV)/.installed
	$(PY) -m conformance ws://127.0.0.1:8448/c2s

# Two homeservers (example.org, example.net) on free loopback ports, in a temporary directory.
demo: $(VENV)/.installed
	$(PY) examples/two_orgs.py

clean:
	rm -rf $(VENV) build *.egg-info
