# Everyday targets. `make test` is the command CI runs (through .ci/run).
CARGO ?= cargo

.PHONY: build test demo bench fmt lint check

build:
	$(CARGO) build --workspace --bins

# The end-to-end tests run the real binaries, so build them first.
test: build
	$(CARGO) nextest run --workspace --no-fail-fast

# Two agents on loopback, a signed artifact uploaded to both.
demo:
	bash scripts/demo.sh

# Release build, then every benchmark; prints the table BENCHMARKS.md quotes.
bench:
	$(CARGO) build --release --workspace --bins
	./target/release/reload-bench

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

check: lint test
