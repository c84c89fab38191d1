# podid — one entry point for building, testing and running the demo.
# `make help` lists the targets. Everything that needs root says so.

CARGO ?= cargo
# install-deps.sh may install the toolchain with rustup during this very run.
export PATH := $(HOME)/.cargo/bin:$(PATH)
VENV ?= $(CURDIR)/target/venv
export PODID_PYTHON ?= $(VENV)/bin/python

.PHONY: help deps build test unit e2e ci fmt fmt-check clippy generate check-generated bench demo clean-netns

help:
	@echo "make demo             the local demo (simulated cluster and Azure, real binaries); needs root"
	@echo "make test             the whole test suite (installs what it needs); needs root"
	@echo "make unit             tests that need neither root nor network namespaces"
	@echo "make fmt | clippy     formatting and lints"
	@echo "make generate         regenerate deploy/crds from the Rust types"
	@echo "make check-generated  fail if deploy/crds is stale"
	@echo "make bench            nmi cache-hit benchmark and mic scale run (release build; figures: docs/performance.md)"
	@echo "make clean-netns      remove namespaces/links left by killed test runs"

deps:
	@tests/scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

# The whole suite, network-namespace and end-to-end suites included. They fail (never skip)
# without root.
test: deps
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --profile ci
	$(CARGO) test --workspace --doc

unit:
	$(CARGO) nextest run --workspace --exclude podid-netsim --exclude podid-e2e

e2e: deps
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run -p podid-e2e --profile ci

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

generate:
	$(CARGO) run -q -p podid-api --bin crdgen -- --out deploy/crds

check-generated:
	$(CARGO) run -q -p podid-api --bin crdgen -- --check deploy/crds
	git diff --exit-code -- deploy/

# Benchmarks (release build); figures and how to read them: docs/performance.md.
bench:
	$(CARGO) run --release -q -p podid-bench --bin nmi-bench
	$(CARGO) build --release -q -p podid-mic -p podid-bench --bins && $(CARGO) run --release -q -p podid-bench --bin mic-bench

clean-netns:
	$(CARGO) run -q -p podid-netsim --bin netsim-sweep

demo: deps
	$(CARGO) build --workspace --bins
	$(CARGO) run -q -p podid-e2e --bin podid-demo
