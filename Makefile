# Everyday targets. `make test` is the command CI runs (through .ci/run).
CARGO ?= cargo

.PHONY: build test guide demo bench fmt lint check

build:
	$(CARGO) build --workspace --bins

# The end-to-end tests run the real binaries, so build them first; then
# the operator's guide, run top to bottom on loopback agents.
test: build
	$(CARGO) nextest run --workspace --no-fail-fast
	bash scripts/operator-guide.sh

# docs/operator-guide.md, every step, on loopback agents (about 2 minutes).
guide: build
	bash scripts/operator-guide.sh

# Three agents on loopback (127.0.0.2-4) over mutual TLS: a signed release
# pushed under load, a bad one halted and reverted, a fleet rollback, the
# agents upgrading themselves, a tampered artifact refused (scripts/demo.sh).
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
