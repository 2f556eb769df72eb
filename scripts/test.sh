#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, API docs, unit and integration tests,
# and the docker-compose testbed with real containers. This is the command
# .ci/run calls; it needs only a Rust toolchain (no system protoc) plus the
# system packages .ci/run installs, and a Docker engine for the testbed.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The API docs build without a broken link or a stray bracket.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
# The testbed test needs the image; a test cannot build it (cargo holds the
# build directory while tests run), so it is built here.
if docker info >/dev/null 2>&1; then
  scripts/testbed.sh build
  export SWITCHYARD_TESTBED=1
else
  echo "test.sh: no Docker engine answers: the compose testbed test is skipped" >&2
fi
cargo test --workspace --all-targets --locked
