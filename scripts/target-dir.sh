#!/usr/bin/env bash
# Prints cargo's target directory for the workspace in the current
# directory (or the one given), as cargo itself resolves it:
# CARGO_TARGET_DIR, build.target-dir in a .cargo/config.toml, else
# ./target. Scripts find the binaries they built under it.
#
#   scripts/target-dir.sh [DIR]
set -euo pipefail
[ $# -gt 0 ] && cd "$1"
meta=$(cargo metadata --format-version 1 --no-deps)
dir=$(printf '%s' "$meta" | grep -o '"target_directory":"[^"]*"' | head -1 | cut -d'"' -f4)
[ -n "$dir" ] || { echo "target-dir.sh: cargo metadata named no target_directory" >&2; exit 1; }
printf '%s\n' "$dir"
