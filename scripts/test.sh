#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and integration tests.
# This is the command .ci/run calls; it needs only a Rust toolchain (no
# system protoc) plus the system packages .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --all-targets --locked
