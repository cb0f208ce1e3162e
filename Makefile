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

# Release build, then every benchmark; prints the tables BENCHMARKS.md quotes.
# nginx and gunicorn (Debian's packages) are the comparison.
bench:
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || (apt-get update && apt-get install -y --no-install-recommends nginx)
	command -v gunicorn >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends gunicorn)
	command -v openssl >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends openssl)
	$(CARGO) build --release --workspace --bins
	./target/release/reload-bench

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

check: lint test
