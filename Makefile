# One entry point for building, running and testing the gateway.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: venv deps build-dev build-prod node-sdk install run test test-rust test-python test-alerts fuzz-rust lint fmt services-up services-down bench bench-tools bench-micro clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Python dependencies (every file under requirements/) are re-installed only when one changes.
$(VENV)/.deps: $(wildcard requirements/*.txt) | $(PY)
	$(PIP) install -q $(addprefix -r ,$(wildcard requirements/*.txt))
	touch $@

deps: $(VENV)/.deps

build-dev: deps
	cd $(CURDIR) && maturin develop -q

build-prod: deps
	cd $(CURDIR) && maturin develop -q --release

# The official stripe Node SDK that tests/e2e/test_stripe_sdk_node.py drives (exact versions of the lock).
NODE_SDK := tests/sdk/node
$(NODE_SDK)/node_modules/.installed: $(NODE_SDK)/package.json $(NODE_SDK)/package-lock.json
	cd $(NODE_SDK) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-sdk: $(NODE_SDK)/node_modules/.installed

install: build-prod node-sdk

run: install
	@echo "demo merchant API key: sk_test_demo"
	gateway serve --config config/gateway.toml --data-dir data --demo

test-rust:
	cargo test --quiet --workspace

test-python: install
	pytest -q $(PYTEST_ARGS)

# Alert rules: promtool (Debian's prometheus package, installed by deploy/prometheus.sh) checks them and
# runs their unit tests (deploy/prometheus/alerts_test.yml).
test-alerts:
	bash deploy/prometheus.sh install
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml

test: install test-rust test-alerts test-python

# libFuzzer targets of the parser and the card-number guard (nightly + cargo-fuzz; rust/fuzz/README.md).
FUZZ_SECONDS ?= 60
fuzz-rust:
	cargo +nightly fuzz run --fuzz-dir rust/fuzz parse_payment -- -max_total_time=$(FUZZ_SECONDS)
	cargo +nightly fuzz run --fuzz-dir rust/fuzz card_scan -- -max_total_time=$(FUZZ_SECONDS)

lint: deps
	cargo fmt --check
	cargo clippy --quiet -p fastpath -- -D warnings
	ruff check python tests bench loadtests
	mypy python/gateway

fmt:
	cargo fmt
	ruff format python tests bench loadtests

services-up:
	bash deploy/services.sh up

services-down:
	bash deploy/services.sh down

# The load generators (k6, oha) are built once into .cache/tools by bench/tools.sh and kept there.
bench-tools:
	bash bench/tools.sh

bench: install bench-tools
	python bench/http_bench.py $(BENCH_ARGS)

bench-micro: install
	python bench/micro.py $(BENCH_ARGS)

clean:
	rm -rf target $(VENV) data
