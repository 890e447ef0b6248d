# The two commands a new machine needs: `make demo` and `make test`. Both run set-up first.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE := target/release
PLUGIN_DIR := $(RELEASE)/plugins
SETUP_STAMP := .venv/.audit-setup-done

.PHONY: setup build test demo bench bench-grid header examples fmt lint fuzz

# scripts/setup is idempotent; the stamp only skips re-checking on every make call.
$(SETUP_STAMP): scripts/setup
	bash scripts/setup
	touch $@

setup: $(SETUP_STAMP)

# Builds the binary and every bundled plugin, then installs the plugins beside the binary
# (library + manifest), exactly as a third-party plugin is installed.
build: setup
	$(CARGO) build --release --workspace
	$(RELEASE)/audit plugins install --force --dir $(PLUGIN_DIR) $(RELEASE)/libaudit_plugin_*.so

test: build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) test --release --workspace

# The loader fuzzers (toolkit/tests/fuzz.rs) with many more cases than `make test` runs, and strict:
# a libtorch panic the engine caught inside an op counts as a finding. AUDIT_FUZZ_CASES=N to change.
fuzz: setup
	AUDIT_FUZZ_CASES=$${AUDIT_FUZZ_CASES:-20000} AUDIT_FUZZ_STRICT=1 $(CARGO) test --release -p audit --test fuzz -- --test-threads 2

demo: build
	bash scripts/demo

bench: build
	bash scripts/bench
	bash scripts/bench-grid

bench-grid: build
	bash scripts/bench-grid

# Regenerates sdk/include/audit_plugin.h from sdk/abi.
header:
	AUDIT_UPDATE_HEADER=1 $(CARGO) test -p audit-abi --test header

# Re-renders examples/rust-plugin and examples/c-plugin from examples/templates.
examples:
	AUDIT_UPDATE_EXAMPLES=1 $(CARGO) test -p audit --lib examples_are_fresh

fmt:
	$(CARGO) fmt --all
